//! Where a checkpoint's loss comes from: `token_loss CHECKPOINT TRACES [N]` tokenizes the APR
//! SFT view of the first N trace records, and prints the mean loss per target token kind.

use std::collections::BTreeMap;

use apr_core::Mode;
use apr_countdown::record::CharCounter;
use apr_countdown::sft::{sequences, SftOptions};
use apr_model::native::{NativeModel, PackedBatch};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ck = apr_model::checkpoint::load(std::path::Path::new(&args[0])).expect("checkpoint");
    let records: Vec<apr_countdown::TraceRecord> =
        apr_countdown::io::read_items(std::path::Path::new(&args[1])).expect("traces");
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    let tok = ck.tokenizer;
    let model = NativeModel::from_weights(&ck.meta.model, &ck.weights).expect("weights");
    let mut by_kind: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut total = (0.0, 0usize);
    for r in records.iter().take(n) {
        for seq in sequences(r, Mode::Apr, SftOptions::default(), &CharCounter) {
            let mut ids = vec![tok.bos_id()];
            ids.extend(tok.encode(&seq.text).expect("encodable"));
            ids.push(tok.eos_id());
            ids.truncate(ck.meta.model.max_seq_len + 1);
            let batch = PackedBatch::from_sequences(&[&ids]);
            let fwd = model.forward(&batch).expect("forward");
            // A target's kind: the phrase that opened its line and the last non-digit token
            // before it, e.g. ("Exploring Operation:", "=") for the digits of a result.
            let (mut head, mut marker) = (String::from("<start>"), String::new());
            for (i, lp) in fwd.logprobs.iter().enumerate() {
                let prev = tok.piece(batch.inputs[i]).to_string();
                if prev == "\n" {
                    head.clear();
                } else if head.is_empty() {
                    head = if prev.bytes().all(|b| b.is_ascii_digit()) {
                        "<number>".into()
                    } else {
                        prev.clone()
                    };
                }
                if !prev.chars().all(|c| c.is_ascii_digit()) || prev.is_empty() {
                    marker = prev.clone();
                }
                let kind = format!("{head:?} / {marker:?}");
                let e = by_kind.entry(kind).or_default();
                e.0 -= *lp as f64;
                e.1 += 1;
                total.0 -= *lp as f64;
                total.1 += 1;
            }
        }
    }
    let mut rows: Vec<_> = by_kind.into_iter().collect();
    rows.sort_by(|a, b| (b.1 .0).total_cmp(&a.1 .0));
    println!(
        "mean loss {:.3} over {} tokens",
        total.0 / total.1 as f64,
        total.1
    );
    for (kind, (sum, count)) in rows.iter().take(40) {
        println!(
            "{:>6.1}% of loss  {:>6.3} mean  {:>7} tokens  {kind}",
            100.0 * sum / total.0,
            sum / *count as f64,
            count
        );
    }
}

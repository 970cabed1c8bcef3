//! A scripted test model: replays given texts token by token through the [`BatchedDecoder`]
//! interface, with a byte-level codec. Used to test the runtime without a neural network.

use crate::decoder::{BatchedDecoder, DecoderError, Sampled, SlotId, StepInput, TextCodec};
use crate::slots::SlotTable;

/// Byte-level codec: token = byte + 3; 0 pad, 1 BOS, 2 EOS.
#[derive(Clone, Debug, Default)]
pub struct ByteCodec;

/// Every ASCII character in order: byte `b` decodes to `ASCII[b..b + 1]`.
const ASCII: &str = "\u{0}\u{1}\u{2}\u{3}\u{4}\u{5}\u{6}\u{7}\u{8}\t\n\u{b}\u{c}\r\u{e}\u{f}\u{10}\u{11}\u{12}\u{13}\u{14}\u{15}\u{16}\u{17}\u{18}\u{19}\u{1a}\u{1b}\u{1c}\u{1d}\u{1e}\u{1f} !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~\u{7f}";

impl TextCodec for ByteCodec {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        if let Some(c) = text.chars().find(|c| !c.is_ascii()) {
            return Err(format!("cannot encode {c:?}"));
        }
        Ok(text.bytes().map(|b| b as u32 + 3).collect())
    }
    fn piece(&self, token: u32) -> &str {
        match token.checked_sub(3) {
            Some(b) if (b as usize) < ASCII.len() => &ASCII[b as usize..b as usize + 1],
            _ => "",
        }
    }
    fn bos(&self) -> u32 {
        1
    }
    fn eos(&self) -> u32 {
        2
    }
}

/// Replays scripts: when a slot's context (without BOS) starts with a script's key, the model
/// writes that script's text after it, then EOS. The longest matching key wins; if the context
/// has left the script, or no key matches, it writes EOS. Tokens come from a [`TextCodec`]
/// (bytes by default): the next token is the first token of the rest of the script.
#[derive(Clone, Debug)]
pub struct ScriptedModel<C: TextCodec = ByteCodec> {
    codec: C,
    scripts: Vec<(String, String)>,
    /// Each slot's tokens; their lengths are `table`'s.
    slots: Vec<Vec<u32>>,
    /// Each slot's text (without BOS), kept in step with `slots`.
    texts: Vec<String>,
    table: SlotTable,
    /// Steps taken, and the most slots used by one step.
    pub steps: usize,
    /// The largest number of rows seen in one step.
    pub max_rows: usize,
}

impl ScriptedModel<ByteCodec> {
    /// A byte-level model with `slots` slots of `context` tokens replaying `scripts`
    /// (key → continuation).
    pub fn new(scripts: Vec<(String, String)>, slots: usize, context: usize) -> Self {
        ScriptedModel::with_codec(ByteCodec, scripts, slots, context)
    }
}

impl<C: TextCodec> ScriptedModel<C> {
    /// A model speaking `codec`'s tokens.
    pub fn with_codec(
        codec: C,
        scripts: Vec<(String, String)>,
        slots: usize,
        context: usize,
    ) -> Self {
        ScriptedModel {
            codec,
            scripts,
            slots: vec![Vec::new(); slots],
            texts: vec![String::new(); slots],
            table: SlotTable::new(slots, context),
            steps: 0,
            max_rows: 0,
        }
    }

    /// Tokens appended in rows of more than one token (prefill).
    pub fn prefilled(&self) -> usize {
        self.table.token_counts().0 as usize
    }

    fn next_token(&self, slot: SlotId) -> u32 {
        let codec = &self.codec;
        let text = &self.texts[slot];
        let best = self
            .scripts
            .iter()
            .filter(|(key, _)| text.starts_with(key.as_str()))
            .max_by_key(|(key, _)| key.len());
        let Some((key, continuation)) = best else {
            return codec.eos();
        };
        let written = &text[key.len()..];
        match continuation.strip_prefix(written) {
            Some(rest) if !rest.is_empty() => codec
                .encode(rest)
                .ok()
                .and_then(|t| t.first().copied())
                .unwrap_or(codec.eos()),
            _ => codec.eos(),
        }
    }
}

impl<C: TextCodec> BatchedDecoder for ScriptedModel<C> {
    fn table(&self) -> &SlotTable {
        &self.table
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError> {
        self.table.check(inputs)?;
        self.table.append(inputs);
        self.steps += 1;
        self.max_rows = self.max_rows.max(inputs.len());
        let mut out = Vec::with_capacity(inputs.len());
        for input in inputs {
            self.slots[input.slot].extend_from_slice(input.tokens);
            let text = &mut self.texts[input.slot];
            text.extend(input.tokens.iter().map(|&t| self.codec.piece(t)));
            out.push(Sampled {
                token: self.next_token(input.slot),
                logprob: -0.5,
            });
        }
        Ok(out)
    }
    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError> {
        let len = self.table.truncate(slot, len)?;
        let s = &mut self.slots[slot];
        s.truncate(len);
        self.texts[slot] = s.iter().map(|&t| self.codec.piece(t)).collect();
        Ok(())
    }
    fn release(&mut self, slot: SlotId) {
        if self.table.release(slot) {
            self.slots[slot].clear();
            self.texts[slot].clear();
        }
    }
}

//! Property tests of the protocol grammar: format→parse round trips, and no input panics.

use apr_core::{split_spawn, JoinBlock, JoinEntry, NodeId, SpawnBlock, StopDetector};
use proptest::prelude::*;

fn node_id() -> impl Strategy<Value = NodeId> {
    prop::collection::vec(0u32..40, 1..6).prop_map(|parts| {
        let text: Vec<String> = parts.iter().map(u32::to_string).collect();
        NodeId::parse(&text.join(",")).unwrap()
    })
}

/// Returned paths: lines of trace-like text that never start with `<`.
fn path() -> impl Strategy<Value = String> {
    prop::collection::vec("[A-Za-z0-9#:,\\[\\]'= +*/-]{1,40}", 1..6)
        .prop_map(|lines| lines.join("\n"))
}

proptest! {
    #[test]
    fn spawn_round_trips(level in 1u32..4, children in prop::collection::vec(node_id(), 1..12)) {
        let block = SpawnBlock { level, children };
        let text = block.format();
        prop_assert_eq!(SpawnBlock::parse(&text).unwrap(), block.clone());
        let parent = format!("Moving to Node #0\nsome search\n{text}");
        let split = split_spawn(&parent).unwrap();
        prop_assert_eq!(split.before, "Moving to Node #0\nsome search\n");
        prop_assert_eq!(split.block, block);
    }

    #[test]
    fn join_round_trips(level in 1u32..4, entries in prop::collection::vec((node_id(), prop::option::of(path())), 1..12)) {
        let block = JoinBlock {
            level,
            entries: entries.into_iter().map(|(node, result)| JoinEntry { node, result }).collect(),
        };
        let text = block.format();
        prop_assert_eq!(JoinBlock::parse(&text).unwrap(), block);
    }

    #[test]
    fn parsers_never_panic_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = SpawnBlock::parse(&text);
        let _ = JoinBlock::parse(&text);
        let _ = split_spawn(&text);
        let _ = NodeId::parse(&text);
    }

    #[test]
    fn parsers_never_panic_on_grammar_like_text(
        lines in prop::collection::vec(prop_oneof![
            Just("<Calling Sub Searches>".to_string()),
            Just("<End Calling Sub Searches>".to_string()),
            Just("<Sub Searches>".to_string()),
            Just("<End Sub Searches>".to_string()),
            "<Start Sub Search [0-9]{0,2} at level [0-9]{0,2}> Moving to Node #[0-9,]{0,6}",
            "<Goal Reached in Sub Search [0-9]{0,2} at level [0-9]{0,2} at Node #[0-9,]{0,6}>?",
            "<No Solution in Sub Search [0-9]{0,2} at level [0-9]{0,2} at Node #[0-9,]{0,6}>?",
            "[a-z <>#,0-9]{0,12}",
        ], 0..10)
    ) {
        let text = lines.join("\n");
        let _ = SpawnBlock::parse(&text);
        let _ = JoinBlock::parse(&text);
        let _ = split_spawn(&text);
    }

    #[test]
    fn stop_detector_agrees_with_a_whole_text_search(
        text in "[<>a-zS ]{0,60}(<Sub Searches>)?[<>a-zS ]{0,20}",
        cuts in prop::collection::vec(0usize..100, 0..8),
    ) {
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut detector = StopDetector::new(&["<Sub Searches>"]);
        let mut last = 0;
        let mut hit = None;
        for cut in cuts.into_iter().chain([text.len()]) {
            if cut < last { continue; }
            hit = detector.push(&text[last..cut]).or(hit);
            last = cut;
        }
        prop_assert_eq!(hit.map(|h| h.start), text.find("<Sub Searches>"));
    }
}

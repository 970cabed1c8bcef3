//! Any bytes through every parser a model's output reaches: they return, they never panic.
#![no_main]

use apr_core::{split_spawn, JoinBlock, NodeId, SpawnBlock, Task};
use apr_countdown::CountdownTask;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = SpawnBlock::parse(&text);
    let _ = JoinBlock::parse(&text);
    if let Ok(split) = split_spawn(&text) {
        for node in &split.block.children {
            let _ = CountdownTask::apr().child_prompt(&text, node);
        }
    }
    let _ = NodeId::parse(&text);
    let _ = apr_countdown::verify::final_answer(&text);
    let _ = apr_countdown::verify::check_answer(&[3, 4, 8, 3], 24, &text);
});

//! The protocol's moves on a thread tree: spawning children from a parent's spawn block,
//! joining their results back into its context, and substituting `<Calling Sub Searches>` for a
//! join block the model writes itself.

use crate::decoder::{BatchedDecoder, TextCodec};
use crate::grammar::{
    ends_with_spawn, join_context, split_spawn, JoinBlock, JoinEntry, SPAWN_OPEN,
};
use crate::task::Task;

use super::outcome::{Failure, Finish, Role};
use super::thread::{Place, Thread, ThreadState};
use super::{Mode, Runtime};

impl<T: Task, C: TextCodec + ?Sized> Runtime<'_, T, C> {
    /// A queued thread of `problem` at `place`, to start from `prompt`; returns its index.
    pub(super) fn new_thread(&mut self, problem: usize, place: Place, prompt: String) -> usize {
        let id = self.threads.len();
        self.problems[problem].live_threads += 1;
        self.problems[problem].threads.push(id);
        let tree_key = match place.parent {
            Some(parent) => {
                let parent = &self.threads[parent];
                // The spawning call has just been recorded, so it is call `segment_count - 1`.
                let call = parent.segment_count.saturating_sub(1);
                let mut key = parent.tree_key.clone();
                key.extend([2 * call + 1, place.index]);
                key
            }
            None => Vec::new(),
        };
        let seed = self.problems[problem].job.seed;
        let allowance = self.config.max_total_tokens;
        let thread = Thread::new(problem, place, tree_key, seed, allowance, prompt);
        self.threads.push(thread);
        id
    }

    /// Replaces the text from byte `cut` with `<Calling Sub Searches>`: truncates the slot to the
    /// last token boundary at or before `cut` and queues the rest as injected tokens.
    pub(super) fn substitute<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        cut: usize,
        decoder: &mut D,
    ) -> Result<(), String> {
        let th = &mut self.threads[t];
        // Tokens in the slot whose text ends at or before the cut (the last sampled token is
        // still pending, not in the slot).
        let (keep, boundary) = th.ctx.boundary_at(cut).ok_or("thread holds no context")?;
        let slot = th.slot.ok_or("thread lost its slot")?;
        decoder.truncate(slot, keep).map_err(|e| e.to_string())?;
        th.ctx.truncate(keep);
        let redo = format!("{}{}", &th.ctx.text[boundary..cut], SPAWN_OPEN);
        let injected = self.codec.encode(&redo)?;
        th.ctx.text.truncate(boundary);
        th.ctx.text.push_str(&redo);
        // The detector sees the text as the thread now holds it, injected opener included.
        th.ctx.stop.restart(boundary);
        if th.ctx.stop.push(&redo).is_some() {
            return Err("substitution wrote a join marker".into());
        }
        // Simplest consistent record: the sampled tokens up to the boundary stay; everything the
        // runtime wrote is marked as injected.
        let mut text_len = th.draft.start_text;
        let mut kept = 0;
        for &tok in &th.draft.tokens {
            let next = text_len + self.codec.piece(tok).len();
            if next > boundary {
                break;
            }
            text_len = next;
            kept += 1;
        }
        th.draft.truncate(kept);
        for &tok in &injected {
            th.draft.push(tok, None);
        }
        if injected.is_empty() {
            return Err("substitution produced no tokens".into());
        }
        th.ctx.pending = injected;
        th.ctx.pending_sampled = None;
        Ok(())
    }

    pub(super) fn end_segment<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let th = &self.threads[t];
        let may_spawn =
            self.config.mode == Mode::Apr && (th.role == Role::Parent || self.config.nested);
        if may_spawn && ends_with_spawn(&th.ctx.text) {
            self.spawn(t, decoder, progress);
        } else {
            self.end_segment_with(t, Finish::Eos, decoder, progress);
        }
    }

    /// Ends a thread for good (EOS without spawn, context limit).
    pub(super) fn end_segment_with<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        finish: Finish,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let seg = self.threads[t].take_segment(finish);
        let p = self.threads[t].problem;
        let seg_len = seg.1.len();
        self.problems[p].segments.push(seg);
        self.retire(t, decoder);
        let th = &self.threads[t];
        match (th.role, th.parent) {
            (Role::Child, Some(parent)) => {
                let round = th.round;
                let processed = th.processed;
                self.threads[parent].processed += processed;
                if let Some(lens) = self.problems[p].round_children.get_mut(round) {
                    lens.push(seg_len);
                }
                self.threads[parent].children_done += 1;
                let parent_th = &self.threads[parent];
                if parent_th.children_done == parent_th.children.len() {
                    self.join(parent, decoder, progress);
                }
            }
            _ => {
                if finish == Finish::ContextLimit {
                    self.fail(p, Failure::RootContextLimit, decoder, progress);
                } else {
                    self.close(p, None, decoder, progress);
                }
            }
        }
    }

    fn spawn<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let p = self.threads[t].problem;
        let text = self.threads[t].ctx.text.clone();
        let split = match split_spawn(&text) {
            Ok(s) => s,
            Err(e) => {
                return self.fail(p, Failure::MalformedSpawn(e.to_string()), decoder, progress)
            }
        };
        let th = &self.threads[t];
        if th.spawn_rounds >= self.config.max_spawn_rounds {
            let budget = self.config.max_spawn_rounds;
            return self.fail(p, Failure::SpawnRounds(budget), decoder, progress);
        }
        if split.block.children.len() > self.config.max_children {
            let failure = Failure::Children {
                named: split.block.children.len(),
                limit: self.config.max_children,
            };
            return self.fail(p, failure, decoder, progress);
        }
        let mut prompts = Vec::with_capacity(split.block.children.len());
        for node in &split.block.children {
            match self.task.child_prompt(&text, node) {
                Ok(prompt) => prompts.push((node.clone(), prompt)),
                Err(e) => {
                    return self.fail(p, Failure::ChildPrompt(e.to_string()), decoder, progress)
                }
            }
        }
        let seg = self.threads[t].take_segment(Finish::Spawn);
        self.problems[p].segments.push(seg);
        let round = self.problems[p].round_children.len();
        self.problems[p].round_children.push(Vec::new());
        let child_prefix = match self.config.conditioning.token_budget {
            Some(b) => format!("Token Budget: {b} "),
            None => String::new(),
        };
        let mut children = Vec::with_capacity(prompts.len());
        for (index, (node, prompt)) in prompts.into_iter().enumerate() {
            let place = Place::child(t, round, index, node);
            let c = self.new_thread(p, place, format!("{child_prefix}{prompt}"));
            children.push(c);
        }
        let share = self.threads[t]
            .allowance
            .saturating_sub(self.threads[t].processed)
            / children.len().max(1);
        for &c in &children {
            self.threads[c].allowance = share;
        }
        let th = &mut self.threads[t];
        th.spawn_rounds += 1;
        th.state = ThreadState::Waiting;
        th.ctx.pending.clear();
        th.children = children.clone();
        th.children_done = 0;
        self.ready.extend(children);
    }

    /// All children of `t` ended: rewrite its context and resume it.
    fn join<D: BatchedDecoder + ?Sized>(
        &mut self,
        t: usize,
        decoder: &mut D,
        progress: &mut dyn FnMut(usize),
    ) {
        let p = self.threads[t].problem;
        let entries: Vec<JoinEntry> = self.threads[t]
            .children
            .iter()
            .map(|&c| {
                let child = &self.threads[c];
                let output = &child.ctx.text;
                JoinEntry {
                    node: child.node.clone().expect("a child thread explores a node"),
                    result: self.task.join_message(output),
                }
            })
            .collect();
        let text = self.threads[t].ctx.text.clone();
        let split = match split_spawn(&text) {
            Ok(s) => s,
            Err(e) => return self.fail(p, Failure::Join(e.to_string()), decoder, progress),
        };
        let block = JoinBlock {
            level: split.block.level,
            entries,
        };
        let new_text = join_context(split.before, &block);
        let before_len = split.before.len();
        let th = &mut self.threads[t];
        th.ctx.text = new_text.clone();
        th.draft.prompt = new_text;
        // Keep the context up to the last token boundary inside the pre-spawn text: in the
        // slot's KV cache if the parent kept its slot, else replayed into a new one.
        let Some((keep, boundary)) = th.ctx.boundary_at(before_len) else {
            return self.fail(
                p,
                Failure::Join("the parent holds no context".into()),
                decoder,
                progress,
            );
        };
        th.ctx.truncate(keep);
        th.draft.reused_prefix = keep;
        let join_tokens = match self.codec.encode(&th.ctx.text[boundary..]) {
            Ok(tokens) if !tokens.is_empty() => tokens,
            Ok(_) => {
                return self.fail(
                    p,
                    Failure::Join("empty join block".into()),
                    decoder,
                    progress,
                )
            }
            Err(e) => return self.fail(p, Failure::Join(e.to_string()), decoder, progress),
        };
        th.ctx.pending_sampled = None;
        th.draft.start_text = th.ctx.text.len();
        th.ctx.stop.restart(th.draft.start_text);
        if keep + join_tokens.len() + 1 > self.context {
            // No room to write anything after the join block: the call ends where it starts.
            th.ctx.tokens.extend(join_tokens);
            th.draft.prompt_tokens = Some(th.ctx.tokens.len());
            return self.end_segment_with(t, Finish::ContextLimit, decoder, progress);
        }
        match th.slot {
            Some(slot) => {
                if let Err(e) = decoder.truncate(slot, keep) {
                    return self.fail(p, Failure::Join(e.to_string()), decoder, progress);
                }
                th.ctx.pending = join_tokens;
                th.state = ThreadState::Running;
            }
            None => {
                // The slot was lent to children: replay the kept context in the next free one.
                let mut pending = std::mem::take(&mut th.ctx.tokens);
                th.ctx.text_ends.clear();
                pending.extend(join_tokens);
                th.ctx.pending = pending;
                th.ctx.replayed = keep;
                th.state = ThreadState::Queued;
                self.ready.push_front(t);
            }
        }
    }
}

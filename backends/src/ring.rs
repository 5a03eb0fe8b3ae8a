//! Ring KV caches for windowed attention, planned once per session and shared by the
//! reference, CPU and GPU sessions and the fixed-point backend's static slots (which
//! take one token at a time: chunk 1).
//!
//! A slot that only windowed attention reads (`window > 0`, with or without sinks) never
//! needs more than its sinks and the last `window` positions before each query. Keeping
//! `sink + window + chunk − 1` rows (the sinks, then a ring) serves every query of a
//! forward call of up to `chunk` tokens, whose rows are appended before they attend, and a
//! rollback of up to `chunk` positions (rejected speculative tokens): the ring still holds
//! every position the next query can see. A module whose attention is all windowed runs
//! in chunks of its widest window (at least [`MIN_RING_CHUNK`]) so the rings stay small.

use std::collections::HashMap;

use kiln_ir::{Module, Op};

use crate::BackendError;

/// Fewest tokens per chunk of a module whose attention is all windowed.
pub const MIN_RING_CHUNK: usize = 16;

/// How a session keeps its KV slots.
#[derive(Clone, Debug, PartialEq)]
pub struct RingPlan {
    /// Most tokens one pass over the graph takes (`max_chunk` unless every attention op
    /// is windowed); also how far back a rollback may go on a ring.
    pub chunk: usize,
    /// Slots kept as rings: `(rows, sinks)`. Every other slot holds the whole context.
    pub slots: HashMap<u32, (usize, usize)>,
}

/// Plans the rings of `module`'s slots for a session of `max_context` positions that
/// would otherwise run up to `max_chunk` tokens at a time.
pub fn plan(module: &Module, max_context: usize, max_chunk: usize) -> RingPlan {
    let windows: Vec<u64> = module
        .insts
        .iter()
        .filter_map(|i| match &i.op {
            Op::Attention { attrs, .. } => Some(attrs.window),
            _ => None,
        })
        .collect();
    let all_windowed = !windows.is_empty() && windows.iter().all(|w| *w > 0);
    let widest = windows.iter().copied().max().unwrap_or(0) as usize;
    let chunk =
        if all_windowed { max_chunk.min(widest.max(MIN_RING_CHUNK)) } else { max_chunk }.min(max_context.max(1));
    let mut need: HashMap<u32, Option<(usize, usize)>> = HashMap::new();
    for inst in &module.insts {
        if let Op::Attention { attrs, .. } = &inst.op {
            let (w, s) = (attrs.window as usize, attrs.sink as usize);
            let e = need.entry(attrs.cache).or_insert(Some((0, 0)));
            *e = match *e {
                Some((mw, ms)) if w > 0 => Some((mw.max(w), ms.max(s))),
                _ => None,
            };
        }
    }
    let slots = need
        .into_iter()
        .filter_map(|(slot, n)| {
            let (w, s) = n?;
            let rows = s.saturating_add(w).saturating_add(chunk - 1);
            (rows < max_context).then_some((slot, (rows, s)))
        })
        .collect();
    RingPlan { chunk, slots }
}

impl RingPlan {
    /// The rollback guard of a session that keeps these slots.
    pub fn guard(&self) -> RollbackGuard {
        RollbackGuard::new((!self.slots.is_empty()).then_some(self.chunk))
    }
}

/// How far back a session with ring slots may roll: a rollback past `slack` positions
/// would read rows the ring has since overwritten, so the session refuses to go on until
/// it restarts at 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollbackGuard {
    slack: Option<usize>,
    lost: bool,
}

impl RollbackGuard {
    /// A guard for a session that may roll back `slack` positions (`None`: no rings, any).
    pub fn new(slack: Option<usize>) -> Self {
        RollbackGuard { slack, lost: false }
    }

    /// Notes a truncation of a session at `from` positions to `to`.
    pub fn truncate(&mut self, from: usize, to: usize) {
        if to == 0 {
            self.lost = false;
        } else if self.slack.is_some_and(|s| from > to + s) {
            self.lost = true;
        }
    }

    /// Whether the session may run again.
    pub fn check(&self) -> Result<(), BackendError> {
        if self.lost {
            return Err(BackendError::BadInput(format!(
                "the session was rolled back more than {} positions, further than its windowed KV \
                 caches keep; truncate it to 0 and run the tokens again",
                self.slack.unwrap_or(0)
            )));
        }
        Ok(())
    }
}

/// The row of a slot of `rows` rows and `sink` sinks that holds position `j`: `j` until
/// the ring wraps, then `sink + (j − sink) mod (rows − sink)`.
pub fn row(j: usize, rows: usize, sink: usize) -> usize {
    if j < rows { j } else { sink + (j - sink) % (rows - sink).max(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_rows_hold_the_sinks_and_every_window_of_a_chunk() {
        let (rows, sink, window, chunk) = (4usize + 8 + 16 - 1, 4usize, 8usize, 16usize);
        let start_max = 200usize;
        assert_eq!((0..rows).map(|j| row(j, rows, sink)).collect::<Vec<_>>(), (0..rows).collect::<Vec<_>>());
        for start in 0..start_max {
            // A chunk at `start`: its rows, and the window of its first query, land in
            // distinct rows, none of them a sink's.
            let lo = (start + 1).saturating_sub(window);
            let held: Vec<usize> = (lo.max(sink)..start + chunk).map(|j| row(j, rows, sink)).collect();
            let mut sorted = held.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), held.len(), "chunk at {start}");
            assert!(held.iter().all(|r| *r >= sink || lo < sink));
        }
    }
}

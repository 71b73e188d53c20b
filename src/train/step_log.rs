//! The device-side step log: what lets a training step run without the host reading anything back.
//!
//! A step needs three facts from its own gradients before the optimizer may run: whether its loss and
//! gradients are finite (the guard, mission.md §9), each group's gradient norm (clipping), and — for the
//! log — its loss terms. Reading them back every step was one host synchronisation per step on the GPU.
//! Instead, each step appends a row to this log *on the device*:
//! ```text
//! [ Σg² of each stepped parameter | loss values | verdict (1 = update, 0 = skip) | clip scale per group ]
//! ```
//! `Backend::record_step` writes the sums and losses, `Backend::step_verdict` decides from them, and
//! everything that mutates training state reads the verdict where it lies: the gated `Backend::adamw`
//! (which also takes the clip scale and the parameter's step count from the device), `Backend::advance_steps`
//! (AdamW's per-parameter step counts live on the device too) and the memory bank's `Backend::ring_enqueue`.
//! A refused step therefore changes nothing, exactly as when the host checked it first. The sums and the
//! update each cover every trainable parameter in one pass (`backend::Segments`: on the GPU, two launches
//! for all the sums and one for all of AdamW, where a launch or two per parameter tensor was the rule).
//!
//! The host reads the whole log once per `train.readback_every` steps (by default every 16 steps, or every
//! `train.log_every` if longer: [`StepLog::read`], one synchronisation) and then does what needs the numbers:
//! the guard's report of a skipped step (with its step number and tensor), the step records of
//! `metrics.jsonl` in step order, the epoch's mean loss, and AdamW's host copy of the step counts (for
//! checkpoints). The device computes the same whatever the interval, so reading every 5 steps gives the same
//! weights and the same `metrics.jsonl`, bit for bit, as reading every step (`tests/reliability.rs`).
use crate::backend::{AdamWGate, AdamWHyper, Backend, Segment, Segments, VerdictLayout};
use crate::params::ParamStore;
use crate::train::guard::{self, NonFinite};
use crate::train::optim::AdamW;

/// Trainable sets whose device tables a log keeps.
const TRAINABLE_SETS: usize = 4;

/// The most loss values a row holds (UR4Rec's total and six terms).
pub const MAX_LOSSES: usize = 7;

/// Steps applied on the device and not yet read back.
pub struct StepLog<B: Backend> {
    /// `capacity` rows of `width` f64.
    rows: B::Wide,
    capacity: usize,
    width: usize,
    groups: usize,
    /// AdamW's step count of every parameter (the device copy; `AdamW::steps` is the host's, brought up to
    /// date by [`StepLog::read`]).
    counts: B::Idx,
    /// Per trainable set seen (stage 3's parity alternation switches between two every step; unfreezing adds a
    /// few): the stepped parameters, their groups on the device and their segments — uploaded once, so a step
    /// uploads nothing for them. Most recently used last; at most [`TRAINABLE_SETS`].
    stepped: Vec<(Vec<usize>, B::Idx, Segments<B>)>,
    pending: Vec<Pending>,
}

/// What the host remembers of a step until its row is read.
struct Pending {
    /// The parameters that stepped (trainable), in storage order: row slot `j` is `params[j]`'s sum.
    params: Vec<usize>,
    /// The group of each of `params`.
    groups: Vec<usize>,
    losses: usize,
}

/// One step as read back from the log.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRead {
    /// The loss values, in the order they were given to [`StepLog::step`].
    pub losses: Vec<f32>,
    /// The parameters that stepped, in storage order, and their gradient sums of squares.
    pub params: Vec<usize>,
    pub sums: Vec<f64>,
    /// The verdict: the update (and the memory-bank enqueue) happened.
    pub ok: bool,
    /// `(group, gradient norm before clipping, clip scale)` of each group with a stepped parameter.
    pub groups: Vec<(usize, f64, f32)>,
}

impl StepRead {
    /// The first stepped parameter, in storage order, whose gradient holds a NaN or an Inf.
    pub fn first_bad_gradient<B: Backend>(&self, store: &ParamStore<B>) -> Option<NonFinite> {
        guard::first_non_finite(store, &self.params, &self.sums)
    }
}

impl<B: Backend> StepLog<B> {
    /// A log of `capacity` rows (at least 1) for `store`'s parameters, with AdamW's step counts as `opt` has
    /// them (a fresh optimizer, or one restored from a checkpoint).
    pub fn new(backend: &B, store: &ParamStore<B>, opt: &AdamW, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let groups = store.groups.len();
        let width = store.infos.len() + MAX_LOSSES + 1 + groups;
        let counts: Vec<u32> = opt.steps.iter()
            .map(|&s| u32::try_from(s).expect("an AdamW step count beyond 2^32 steps"))
            .collect();
        StepLog { rows: backend.wide_zeros(capacity * width), capacity, width, groups, counts: backend.idx_from_host(&counts),
                  stepped: Vec::new(), pending: Vec::new() }
    }

    /// Steps applied and not read yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// No room for another step: [`StepLog::read`] first.
    pub fn is_full(&self) -> bool {
        self.pending.len() == self.capacity
    }

    /// The step after its backward, on the device: records the gradient sums of the trainable parameters and
    /// `losses` (1-element buffers), decides (`losses[checked]` and every sum finite), and runs the gated
    /// AdamW update of every trainable parameter (group `g` at `lrs[g]`, clipped to `clip` per group) and
    /// the step counts' advance. Returns the row, for [`StepLog::gate`]. Reads nothing back.
    #[allow(clippy::too_many_arguments)]
    pub fn step(&mut self, backend: &B, store: &mut ParamStore<B>, opt: &AdamW, lrs: &[f32], clip: f32,
                losses: &[&B::Buf], checked: usize) -> usize {
        assert!(!self.is_full(), "step log full: read it before the next step");
        assert_eq!(lrs.len(), self.groups, "one learning rate per parameter group");
        assert!(losses.len() <= MAX_LOSSES && checked < losses.len(), "step log: {} losses, checked {checked}", losses.len());
        let row = self.pending.len();
        let at = row * self.width;
        let params: Vec<usize> = (0..store.infos.len()).filter(|&i| store.infos[i].trainable).collect();
        match self.stepped.iter().position(|(p, _, _)| *p == params) {
            Some(i) => {
                let hit = self.stepped.remove(i);
                self.stepped.push(hit);
            }
            None => {
                let groups: Vec<u32> = params.iter().map(|&i| store.infos[i].group as u32).collect();
                let segs = params.iter().map(|&i| {
                    let p = &store.infos[i];
                    Segment { offset: p.offset, len: p.len, group: p.group, param: i,
                              weight_decay: if p.decay { opt.weight_decay } else { 0.0 } }
                }).collect();
                if self.stepped.len() == TRAINABLE_SETS {
                    self.stepped.remove(0);
                }
                self.stepped.push((params.clone(), backend.idx_from_host(&groups), Segments::new(backend, segs)));
            }
        }
        let (_, groups_dev, segs) = self.stepped.last().expect("set above");
        backend.record_step(&mut self.rows, at, &store.grads, segs, losses);
        let n = params.len();
        let layout = VerdictLayout { sums: n, checked_at: n + checked, ok_at: n + losses.len(),
                                     scales_at: n + losses.len() + 1, groups: self.groups };
        backend.step_verdict(&mut self.rows, at, &layout, groups_dev, clip);
        let hp = AdamWHyper { beta1: opt.beta1, beta2: opt.beta2, eps: opt.eps };
        let gate = AdamWGate { log: &self.rows, ok_at: at + layout.ok_at, scales_at: at + layout.scales_at, counts: &self.counts };
        backend.adamw(&mut store.values, &store.grads, &mut store.m, &mut store.v, segs, &hp, lrs, &gate);
        backend.advance_steps(&mut self.counts, segs, &self.rows, at + layout.ok_at);
        let groups = params.iter().map(|&i| store.infos[i].group).collect();
        self.pending.push(Pending { params, groups, losses: losses.len() });
        row
    }

    /// Where the verdict of the step in `row` lies (for `Backend::ring_enqueue`).
    pub fn gate(&self, row: usize) -> (&B::Wide, usize) {
        let p = &self.pending[row];
        (&self.rows, row * self.width + p.params.len() + p.losses)
    }

    /// Reads every pending step back (one host synchronisation on the GPU), oldest first, and brings AdamW's
    /// host step counts up to date. The log is empty afterwards.
    pub fn read(&mut self, backend: &B, opt: &mut AdamW) -> Vec<StepRead> {
        if self.pending.is_empty() {
            return Vec::new();
        }
        let host = backend.wide_to_host(&self.rows);
        let mut out = Vec::with_capacity(self.pending.len());
        for (row, p) in self.pending.drain(..).enumerate() {
            let r = &host[row * self.width..(row + 1) * self.width];
            let n = p.params.len();
            let sums = r[..n].to_vec();
            let losses = r[n..n + p.losses].iter().map(|&v| v as f32).collect();
            let ok = r[n + p.losses] != 0.0;
            let scales = &r[n + p.losses + 1..];
            // Each group's norm as the verdict computed it: its sums added in row (storage) order.
            let groups = (0..self.groups).filter(|&g| p.groups.contains(&g)).map(|g| {
                let norm = p.groups.iter().zip(&sums).filter(|(&pg, _)| pg == g).map(|(_, &s)| s).sum::<f64>().sqrt();
                (g, norm, scales[g] as f32)
            }).collect();
            if ok {
                for &i in &p.params {
                    opt.steps[i] += 1;
                }
            }
            out.push(StepRead { losses, params: p.params, sums, ok, groups });
        }
        out
    }

    /// AdamW's step counts as the device has them (tests: they must equal `AdamW::steps` after a read).
    pub fn counts_on_device(&self, backend: &B) -> Vec<u32> {
        backend.idx_to_host(&self.counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::params::{Init, ParamBuilder};
    use crate::rng::Rng;

    /// Steps logged and read in windows of 3, with the trainable set changing and a NaN step in the middle:
    /// the refused step moves nothing, AdamW's device counts equal the host's after each read, each read step
    /// carries its own losses and sums, and the weights equal those of steps read one by one.
    #[test]
    fn windows_of_steps_read_back_in_order_and_match_reading_each_step() {
        let be = CpuBackend::new();
        let build = || {
            let mut rng = Rng::new(5);
            let mut b = ParamBuilder::new();
            b.add("g0", "a", &[3], Init::Values(vec![0.5, -1.0, 2.0]), &mut rng);
            b.add("g1", "b", &[2], Init::Values(vec![1.0, 1.5]), &mut rng);
            b.add("g0", "c", &[1], Init::Values(vec![-0.25]), &mut rng);
            b.build(&be)
        };
        // Step 4 has a NaN in b's gradient (element 3).
        let grads = |step: usize| -> Vec<f32> {
            (0..6).map(|i| if step == 4 && i == 3 { f32::NAN } else { ((step * 7 + i * 3) % 5) as f32 * 0.3 - 0.6 }).collect()
        };
        let run = |window: usize| {
            let mut store = build();
            let mut opt = AdamW::new(3, 0.9, 0.999, 1e-8, 0.01);
            let mut log = StepLog::new(&be, &store, &opt, window);
            let mut reads = Vec::new();
            for step in 0..9 {
                // Group g1 is frozen on steps 2 and 3 (a trainable set that changes within a window).
                store.set_group_trainable(1, !(2..4).contains(&step));
                store.grads = grads(step);
                let loss = be.from_host(&[step as f32]);
                log.step(&be, &mut store, &opt, &[0.1, 0.05], 1.0, &[&loss], 0);
                if log.is_full() || step == 8 {
                    reads.extend(log.read(&be, &mut opt));
                    assert_eq!(log.counts_on_device(&be), opt.steps.iter().map(|&s| s as u32).collect::<Vec<_>>());
                }
            }
            (store.values, store.m, store.v, opt.steps, reads)
        };
        let (values, m, v, steps, reads) = run(3);
        assert_eq!(reads.len(), 9);
        for (step, r) in reads.iter().enumerate() {
            assert_eq!(r.losses, vec![step as f32], "step {step}'s row");
            assert_eq!(r.ok, step != 4, "step {step}'s verdict");
            let frozen = (2..4).contains(&step);
            assert_eq!(r.params, if frozen { vec![0, 2] } else { vec![0, 1, 2] }, "step {step}'s stepped parameters");
        }
        // a and c stepped on the 8 good steps; b on the 6 good steps it was trainable.
        assert_eq!(steps, vec![8, 6, 8]);
        assert_eq!((values, m, v, steps), { let r = run(1); (r.0, r.1, r.2, r.3) }, "reading every step changes nothing");
    }
}

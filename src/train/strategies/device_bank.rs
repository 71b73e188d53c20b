//! The memory bank as the trainer holds it: keys and slot owners on the backend, bookkeeping on the host.
//!
//! On the GPU the keys (65,536 × 256 × 4 bytes = 64 MiB per bank at the reference shape) stay in device
//! memory for the whole run: the fused InfoNCE reads them where they are and `Backend::ring_enqueue` writes
//! the batch's keys into them, so a step neither uploads a bank nor reads the new keys back. The host keeps
//! what logging and masking bookkeeping need (slot users and steps, pointer, fill) in a key-less
//! [`MemoryBank`]; [`DeviceBank::download`] rebuilds the full host bank for a checkpoint or a model
//! selection. The keys may be stored in bf16 or f16 (`ur4rec.bank_format`): rounded once when written,
//! widened to f32 by the InfoNCE kernels.
//!
//! An enqueue is gated by its step's verdict on the device (`train::step_log`): a refused step (non-finite
//! loss or gradient) writes nothing and leaves the pointer where it was (the pointer lives on the device with
//! the keys), but the host only learns which steps were refused when it reads the step log. So the host's
//! bookkeeping lags: enqueues wait in `unsettled` until [`DeviceBank::settle`] records the accepted ones,
//! in order — after which the host's pointer and slot records are the device's again.
use crate::backend::{Backend, StoreFormat, Stored};
use crate::tape::SharedBank;
use crate::train::strategies::MemoryBank;
use std::sync::Arc;

pub struct DeviceBank<B: Backend> {
    /// Slot users and steps, pointer and fill; its `keys` are empty (they are `keys` below).
    slots: MemoryBank,
    /// The keys `[size, dim]` and the device copy of `slots.users` `[size]` (the InfoNCE masks same-user
    /// slots on the device). Shared with the step's tape (its InfoNCE nodes read them in the backward),
    /// which is dropped before the enqueue writes.
    shared: SharedBank<B>,
    /// The next slot to write `[1]`, on the device (it moves only on an accepted step).
    ptr: B::Idx,
    /// The enqueues the step log has not confirmed yet: their step and users.
    unsettled: Vec<(u64, Vec<u32>)>,
}

impl<B: Backend> DeviceBank<B> {
    /// Moves a host bank to the backend, its keys rounded to `format`.
    pub fn upload(backend: &B, mut bank: MemoryBank, format: StoreFormat) -> Self {
        let keys = Arc::new(Stored::from_host(backend, &bank.keys, format));
        let users = Arc::new(backend.idx_from_host(&bank.users));
        let ptr = backend.idx_from_host(&[bank.ptr as u32]);
        bank.keys = Vec::new();
        DeviceBank { slots: bank, shared: (keys, users), ptr, unsettled: Vec::new() }
    }

    /// The whole bank on the host (keys widened to f32: exact, so uploading it again gives the same bank).
    pub fn download(&self, backend: &B) -> MemoryBank {
        assert!(self.unsettled.is_empty(), "device bank download before the step log was read (settle first)");
        assert_eq!(backend.idx_to_host(&self.ptr), vec![self.slots.ptr as u32], "device bank: the pointers disagree");
        let mut bank = self.slots.clone();
        bank.keys = self.shared.0.to_host(backend);
        bank
    }

    /// Writes the batch's keys `[b, dim]` (on the backend) for `users` (`users_dev` is the same ids on the
    /// backend) at the pointer, wrapping around, if `gate` (the step's verdict in the step log) allows it.
    /// The host's bookkeeping (slots written at `step`) follows at [`DeviceBank::settle`].
    pub fn enqueue(&mut self, backend: &B, keys: &B::Buf, users: &[u32], users_dev: &B::Idx, step: u64, gate: (&B::Wide, usize)) {
        assert_eq!(backend.len(keys), users.len() * self.slots.dim, "device bank enqueue: keys are [b, dim]");
        let (bank_keys, bank_users) = &mut self.shared;
        let (bank, bank_users) = (Arc::get_mut(bank_keys), Arc::get_mut(bank_users));
        let (Some(bank), Some(bank_users)) = (bank, bank_users) else {
            panic!("device bank enqueue while a tape still reads the bank (drop the step's tape first)")
        };
        backend.ring_enqueue(bank, bank_users, &mut self.ptr, keys, users_dev, self.slots.dim, gate);
        self.unsettled.push((step, users.to_vec()));
    }

    /// Once the step log is read: records the enqueues of every step not `refused`, in order (a refused step
    /// wrote nothing on the device).
    pub fn settle(&mut self, refused: &[u64]) {
        for (step, users) in self.unsettled.drain(..) {
            if !refused.contains(&step) {
                self.slots.record(&users, step);
            }
        }
    }

    /// What the InfoNCE of a step reads: the keys and their users.
    pub fn on_device(&self) -> &SharedBank<B> {
        &self.shared
    }

    /// The bookkeeping (users and steps of each slot, pointer, fill); its `keys` are empty.
    pub fn slots(&self) -> &MemoryBank {
        &self.slots
    }

    pub fn format(&self) -> StoreFormat {
        self.shared.0.format()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::rng::Rng;

    /// The device bank after any sequence of enqueues downloads to exactly the host bank that had the same
    /// enqueues (f32), or to it with keys rounded (16-bit formats).
    #[test]
    fn matches_the_host_bank_through_wraps_and_oversized_batches() {
        let be = CpuBackend::new();
        let (size, dim) = (7, 3);
        for format in [StoreFormat::F32, StoreFormat::Bf16, StoreFormat::F16] {
            let mut rng = Rng::new(11);
            let mut host = MemoryBank::new(size, dim, &mut rng);
            let mut dev = DeviceBank::upload(&be, host.clone(), format);
            let open = be.wide_from_host(&[1.0]);
            for (step, b) in [3usize, 5, 1, 9, 7, 2].into_iter().enumerate() {
                let users: Vec<u32> = (0..b as u32).map(|i| 1 + (step as u32 * 10 + i) % 13).collect();
                let keys: Vec<f32> = (0..b * dim).map(|_| rng.normal()).collect();
                host.enqueue(&keys, &users, step as u64);
                dev.enqueue(&be, &be.from_host(&keys), &users, &be.idx_from_host(&users), step as u64, (&open, 0));
                dev.settle(&[]);
                let got = dev.download(&be);
                let mut want = host.clone();
                want.keys.iter_mut().for_each(|x| *x = format.round(*x));
                assert_eq!(got, want, "{format:?} after enqueue {step} of {b} rows");
                assert_eq!(&**dev.on_device().1, &host.users, "device users");
            }
        }
    }

    #[test]
    #[should_panic(expected = "still reads the bank")]
    fn enqueue_refuses_while_a_tape_holds_the_bank() {
        let be = CpuBackend::new();
        let mut dev = DeviceBank::upload(&be, MemoryBank::new(4, 2, &mut Rng::new(1)), StoreFormat::F32);
        let _held = dev.on_device().0.clone();
        let open = be.wide_from_host(&[1.0]);
        dev.enqueue(&be, &be.from_host(&[1.0, 0.0]), &[1], &be.idx_from_host(&[1]), 1, (&open, 0));
    }

    /// Enqueues whose gate is closed (refused steps) write nothing and leave the pointer; once settled, the
    /// bank — keys, users, steps, pointer — is the host bank that had only the accepted enqueues.
    #[test]
    fn refused_enqueues_change_nothing_once_settled() {
        let be = CpuBackend::new();
        let (size, dim) = (5, 2);
        let mut rng = Rng::new(3);
        let mut want = MemoryBank::new(size, dim, &mut rng);
        let mut dev = DeviceBank::upload(&be, want.clone(), StoreFormat::F32);
        // Settled every 3 enqueues (a reading interval of 3), with refused steps between accepted ones.
        let gates = be.wide_from_host(&[1.0, 0.0]);
        let refused_steps = [1u64, 2, 5, 8, 9];
        let mut refused_now = Vec::new();
        for step in 0..11u64 {
            let b = [3usize, 4, 2, 6][step as usize % 4];
            let users: Vec<u32> = (0..b as u32).map(|i| 1 + (step as u32 * 7 + i) % 11).collect();
            let keys: Vec<f32> = (0..b * dim).map(|_| rng.normal()).collect();
            let refused = refused_steps.contains(&step);
            dev.enqueue(&be, &be.from_host(&keys), &users, &be.idx_from_host(&users), step, (&gates, if refused { 1 } else { 0 }));
            if refused {
                refused_now.push(step);
            } else {
                want.enqueue(&keys, &users, step);
            }
            if step % 3 == 2 || step == 10 {
                dev.settle(&refused_now);
                refused_now.clear();
                assert_eq!(dev.download(&be), want, "after step {step}");
            }
        }
    }
}

//! The memory bank as the trainer holds it: keys and slot owners on the backend, bookkeeping on the host.
//!
//! On the GPU the keys (65,536 × 256 × 4 bytes = 64 MiB per bank at the reference shape) stay in device
//! memory for the whole run: the fused InfoNCE reads them where they are and `Backend::ring_enqueue` writes
//! the batch's keys into them, so a step neither uploads a bank nor reads the new keys back. The host keeps
//! what logging and masking bookkeeping need (slot users and steps, pointer, fill) in a key-less
//! [`MemoryBank`]; [`DeviceBank::download`] rebuilds the full host bank for a checkpoint or a model
//! selection. The keys may be stored in bf16 or f16 (`ur4rec.bank_format`): rounded once when written,
//! widened to f32 by the InfoNCE kernels.
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
}

impl<B: Backend> DeviceBank<B> {
    /// Moves a host bank to the backend, its keys rounded to `format`.
    pub fn upload(backend: &B, mut bank: MemoryBank, format: StoreFormat) -> Self {
        let keys = Arc::new(Stored::from_host(backend, &bank.keys, format));
        let users = Arc::new(backend.idx_from_host(&bank.users));
        bank.keys = Vec::new();
        DeviceBank { slots: bank, shared: (keys, users) }
    }

    /// The whole bank on the host (keys widened to f32: exact, so uploading it again gives the same bank).
    pub fn download(&self, backend: &B) -> MemoryBank {
        let mut bank = self.slots.clone();
        bank.keys = self.shared.0.to_host(backend);
        bank
    }

    /// Writes the batch's keys `[b, dim]` (on the backend) for `users` (`users_dev` is the same ids on the
    /// backend) at the pointer, wrapping around; all slots written carry `step`.
    pub fn enqueue(&mut self, backend: &B, keys: &B::Buf, users: &[u32], users_dev: &B::Idx, step: u64) {
        assert_eq!(backend.len(keys), users.len() * self.slots.dim, "device bank enqueue: keys are [b, dim]");
        let (bank_keys, bank_users) = &mut self.shared;
        let (bank, bank_users) = (Arc::get_mut(bank_keys), Arc::get_mut(bank_users));
        let (Some(bank), Some(bank_users)) = (bank, bank_users) else {
            panic!("device bank enqueue while a tape still reads the bank (drop the step's tape first)")
        };
        backend.ring_enqueue(bank, bank_users, keys, users_dev, self.slots.dim, self.slots.ptr);
        self.slots.record(users, step);
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
            for (step, b) in [3usize, 5, 1, 9, 7, 2].into_iter().enumerate() {
                let users: Vec<u32> = (0..b as u32).map(|i| 1 + (step as u32 * 10 + i) % 13).collect();
                let keys: Vec<f32> = (0..b * dim).map(|_| rng.normal()).collect();
                host.enqueue(&keys, &users, step as u64);
                dev.enqueue(&be, &be.from_host(&keys), &users, &be.idx_from_host(&users), step as u64);
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
        dev.enqueue(&be, &be.from_host(&[1.0, 0.0]), &[1], &be.idx_from_host(&[1]), 1);
    }
}

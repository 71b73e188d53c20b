//! Parameters, gradients and AdamW moments in flat buffers with named ranges.
//!
//! Every parameter is a named range of one flat value buffer; gradients and both AdamW moments mirror
//! that layout. Zeroing gradients is one fill, the optimizer is one pass per group, and a checkpoint is
//! one tensor per named range. Parameter groups (e.g. `sasrec`, `retriever`) are sets of ranges whose
//! learning rate, clipping and trainable flag apply together; the trainable flag can change at any step
//! (stage changes, progressive unfreezing) and can also be set per parameter.
use crate::backend::{Backend, StoreFormat};
use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// Stable name, e.g. `sasrec.blocks.0.attn.qkv.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    pub group: usize,
    pub trainable: bool,
    /// AdamW weight decay applies to this parameter (the reference decays everything; kept configurable).
    pub decay: bool,
    /// An item embedding table: the forward reads it in [`ParamStore::table_format`] (`Tape::param`).
    pub table: bool,
}

#[derive(Clone, Debug)]
pub struct GroupInfo {
    pub name: String,
}

/// Identifies one parameter in a [`ParamStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

/// How a parameter is initialised.
#[derive(Clone, Debug)]
pub enum Init {
    Zeros,
    Ones,
    Normal(f32),
    Uniform(f32),
    /// Normal rows with row 0 (padding) zero.
    NormalPadded(f32),
    /// Given values.
    Values(Vec<f32>),
}

/// Collects parameter definitions on the host, then becomes a [`ParamStore`] on a backend.
#[derive(Default)]
pub struct ParamBuilder {
    infos: Vec<ParamInfo>,
    groups: Vec<GroupInfo>,
    values: Vec<f32>,
}

impl ParamBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The group's index, creating it on first use.
    pub fn group(&mut self, name: &str) -> usize {
        if let Some(i) = self.groups.iter().position(|g| g.name == name) {
            return i;
        }
        self.groups.push(GroupInfo { name: name.to_string() });
        self.groups.len() - 1
    }

    pub fn add(&mut self, group: &str, name: &str, shape: &[usize], init: Init, rng: &mut Rng) -> ParamId {
        assert!(!self.infos.iter().any(|p| p.name == name), "duplicate parameter name {name}");
        let group = self.group(group);
        let len: usize = shape.iter().product();
        let offset = self.values.len();
        match init {
            Init::Zeros => self.values.extend(std::iter::repeat_n(0.0, len)),
            Init::Ones => self.values.extend(std::iter::repeat_n(1.0, len)),
            Init::Normal(std) => self.values.extend((0..len).map(|_| rng.normal() * std)),
            Init::Uniform(b) => self.values.extend((0..len).map(|_| (rng.uniform() * 2.0 - 1.0) * b)),
            Init::NormalPadded(std) => {
                let cols = *shape.last().unwrap();
                self.values.extend((0..len).map(|i| if i < cols { 0.0 } else { rng.normal() * std }));
            }
            Init::Values(v) => {
                assert_eq!(v.len(), len, "initial values for {name}");
                self.values.extend(v);
            }
        }
        self.infos.push(ParamInfo { name: name.to_string(), shape: shape.to_vec(), offset, len, group, trainable: true, decay: true,
                                       table: false });
        ParamId(self.infos.len() - 1)
    }

    /// Marks `id` as an item embedding table (see [`ParamInfo::table`]).
    pub fn mark_table(&mut self, id: ParamId) {
        self.infos[id.0].table = true;
    }

    pub fn build<B: Backend>(self, backend: &B) -> ParamStore<B> {
        let n = self.values.len();
        ParamStore {
            values: backend.from_host(&self.values),
            grads: backend.zeros(n),
            m: backend.zeros(n),
            v: backend.zeros(n),
            infos: self.infos,
            groups: self.groups,
            table_format: StoreFormat::F32,
        }
    }
}

pub struct ParamStore<B: Backend> {
    pub values: B::Buf,
    pub grads: B::Buf,
    /// AdamW first and second moments.
    pub m: B::Buf,
    pub v: B::Buf,
    pub infos: Vec<ParamInfo>,
    pub groups: Vec<GroupInfo>,
    /// The storage format the forward reads the item embedding tables in (`train.table_format`); the
    /// master values above stay f32.
    pub table_format: StoreFormat,
}

impl<B: Backend> ParamStore<B> {
    pub fn len(&self) -> usize {
        self.infos.iter().map(|p| p.len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }
    pub fn info(&self, id: ParamId) -> &ParamInfo {
        &self.infos[id.0]
    }
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.infos.iter().position(|p| p.name == name).map(ParamId)
    }
    pub fn group_index(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }
    pub fn set_group_trainable(&mut self, group: usize, trainable: bool) {
        for p in self.infos.iter_mut().filter(|p| p.group == group) {
            p.trainable = trainable;
        }
    }
    /// Sets the flag on every parameter whose name starts with `prefix`; returns how many matched.
    pub fn set_prefix_trainable(&mut self, prefix: &str, trainable: bool) -> usize {
        let mut n = 0;
        for p in self.infos.iter_mut().filter(|p| p.name.starts_with(prefix)) {
            p.trainable = trainable;
            n += 1;
        }
        n
    }
    pub fn zero_grads(&mut self, backend: &B) {
        backend.fill(&mut self.grads, 0.0);
    }
    /// Host copy of one parameter's values.
    pub fn values_of(&self, backend: &B, id: ParamId) -> Vec<f32> {
        let p = &self.infos[id.0];
        backend.to_host(&backend.copy_range(&self.values, p.offset, p.len))
    }
    pub fn grads_of(&self, backend: &B, id: ParamId) -> Vec<f32> {
        let p = &self.infos[id.0];
        backend.to_host(&backend.copy_range(&self.grads, p.offset, p.len))
    }
    pub fn set_values(&mut self, backend: &B, id: ParamId, values: &[f32]) {
        let p = &self.infos[id.0];
        assert_eq!(values.len(), p.len, "set_values({})", p.name);
        backend.write_range(&mut self.values, p.offset, &backend.from_host(values));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::tape::Tape;

    /// With a 16-bit table format the forward sees the item table rounded (and nothing else), while the
    /// gradient reaches the f32 master unchanged.
    #[test]
    fn tables_are_read_in_the_table_format_and_train_in_f32() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(3);
        let mut b = ParamBuilder::new();
        let table = b.add("g", "table", &[4, 3], Init::Normal(1.0), &mut rng);
        b.mark_table(table);
        let dense = b.add("g", "dense", &[3], Init::Normal(1.0), &mut rng);
        let mut store = b.build(&be);
        let master = store.values.clone();
        for format in [StoreFormat::F32, StoreFormat::Bf16, StoreFormat::F16] {
            store.table_format = format;
            let mut tape = Tape::new(&be, 0, 0);
            let (t, d) = (tape.param(&store, table), tape.param(&store, dense));
            let want: Vec<f32> = master[..12].iter().map(|&v| format.round(v)).collect();
            assert_eq!(tape.to_host(t), want, "{format:?}: the table as stored");
            assert_eq!(tape.to_host(d), master[12..], "{format:?}: other parameters are not rounded");
            if format != StoreFormat::F32 {
                assert_ne!(want, master[..12], "{format:?}: the random values do round");
            }
            let s = tape.sum(t);
            store.zero_grads(&be);
            tape.backward(s, &mut store.grads);
            assert_eq!(store.grads[..12], [1.0; 12], "{format:?}: the gradient of the sum reaches the master");
        }
    }
}

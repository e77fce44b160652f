//! Activation recomputation (gradient checkpointing). A recomputed MiT block keeps only its input
//! and its output in the training graph: its forward runs with the graph dropped as it goes, and
//! the backward pass runs it again from the saved input, with the same dropout and drop-path
//! draws, and backpropagates through that second copy. Memory then holds one block's
//! activations at a time instead of the whole encoder's, for one more block forward per step.
//!
//! The block enters the outer graph as a custom op on its input, and a custom op passes a
//! gradient to its input only: the gradients of the block's own parameters are kept in a
//! [`GradStash`] that [`crate::model::Segformer::backward`] adds to the outer ones.

use crate::SeededRng;
use candle_core::backprop::GradStore;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, TensorId, Var,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the backward pass recomputes instead of keeping (profile key `adapt.recompute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Every activation stays in memory until the backward pass.
    #[default]
    None,
    /// Each encoder block is run again in the backward pass: the encoder's activations drop to
    /// its blocks' inputs and outputs, for one more encoder forward per training step.
    Blocks,
}

/// Parameter gradients computed inside recomputed blocks, waiting to join the outer gradients.
#[derive(Clone, Default)]
pub(crate) struct GradStash(Arc<Mutex<HashMap<TensorId, Tensor>>>);

impl GradStash {
    fn add(&self, id: TensorId, g: &Tensor) -> Result<()> {
        let mut m = self.0.lock().expect("stash lock");
        let sum = match m.remove(&id) {
            Some(acc) => (acc + g)?,
            None => g.clone(),
        };
        m.insert(id, sum);
        Ok(())
    }

    /// Drops what an earlier, unfinished backward pass left.
    pub(crate) fn clear(&self) {
        self.0.lock().expect("stash lock").clear();
    }

    /// Moves the stashed gradients into `grads`, adding to any already there.
    pub(crate) fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let stashed = std::mem::take(&mut *self.0.lock().expect("stash lock"));
        for (id, g) in stashed {
            let sum = match grads.get_id(id) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            grads.insert_id(id, sum);
        }
        Ok(())
    }
}

/// A function of one tensor that may draw from the training RNG: a block's forward.
pub(crate) type Forward = dyn Fn(&Tensor, Option<&mut SeededRng>) -> Result<Tensor> + Send + Sync;

/// `f(x)` with its intermediate activations recomputed in the backward pass instead of kept.
/// Where `x` carries no gradient, the call is a plain `f(x)`: the block's parameters still need
/// theirs, and only the outer graph reaches them then.
pub(crate) fn recomputed(
    x: &Tensor,
    rng: Option<&mut SeededRng>,
    stash: &GradStash,
    f: Arc<Forward>,
) -> Result<Tensor> {
    if !x.track_op() {
        return f(x, rng);
    }
    let draws = rng.as_deref().cloned();
    // Detached, the output holds no graph: the block's intermediates are freed here.
    let out = f(&x.detach(), rng)?.detach();
    let op = Rerun {
        out: Mutex::new(Some(out)),
        f,
        draws,
        stash: stash.clone(),
    };
    x.apply_op1(op)
}

/// A scalar whose gradient with respect to its input is the outer pass's gradient: the backward
/// pass from it is the vector-Jacobian product the outer pass asks for. `(y * grad).sum()` would
/// do the same with two more tensors of `y`'s size, and a third for `grad`'s own gradient.
struct Seed(Tensor);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "gradient-seed"
    }

    // The value is never read: only the backward pass from it is.
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let shape = Shape::from(());
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

struct Rerun {
    /// The forward's result, handed to the graph node once.
    out: Mutex<Option<Tensor>>,
    f: Arc<Forward>,
    /// The RNG as the forward found it, so the rerun draws the same masks.
    draws: Option<SeededRng>,
    stash: GradStash,
}

impl Rerun {
    /// The forward's result as the storage `pick` takes from it (None: another device's),
    /// laid out from the start of its storage so that the storage is the tensor (a longer tail
    /// is unused, not wrong).
    fn hand_over<S>(
        &self,
        pick: impl Fn(&Storage, &Layout) -> Option<Result<S>>,
    ) -> Result<(S, Shape)> {
        let out = match self.out.lock().expect("rerun lock").take() {
            Some(t) if t.layout().is_contiguous() && t.layout().start_offset() == 0 => t,
            Some(t) => t.copy()?,
            None => bail!("recomputed block: forward applied twice"),
        };
        let (s, l) = out.storage_and_layout();
        match pick(&s, l) {
            Some(storage) => Ok((storage?, l.shape().clone())),
            None => bail!("recomputed block: its output is on another device than its input"),
        }
    }
}

impl CustomOp1 for Rerun {
    fn name(&self) -> &'static str {
        "recomputed-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        self.hand_over(|s, l| match s {
            Storage::Cpu(c) => Some(c.try_clone(l)),
            _ => None,
        })
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        self.hand_over(|s, l| match s {
            Storage::Cuda(c) => Some(c.try_clone(l)),
            _ => None,
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let mut draws = self.draws.clone();
        let y = (self.f)(x.as_tensor(), draws.as_mut())?;
        let grads = y.apply_op1(Seed(grad.detach()))?.backward_releasing()?;
        let ids: Vec<TensorId> = grads.get_ids().copied().collect();
        for id in ids {
            if id != x.as_tensor().id() {
                self.stash.add(id, grads.get_id(id).expect("listed id"))?;
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}

//! [`FastOps`] under autodiff: the two differentiable ops register a hand-written backward that
//! calls the inner backend's own [`FastOps`] (so a CUDA backward runs cuBLASLt products too).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;

use super::{AttentionSaved, FastOps};

/// `C = op(A) op(B)`: `dA = G op(B)ᵀ` (or its transpose when A was transposed), and
/// `dB = op(A)ᵀ G` (likewise).
#[derive(Debug)]
struct MatmulBackward {
    transpose_lhs: bool,
    transpose_rhs: bool,
}

impl<B: FastOps> Backward<B, 2> for MatmulBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [lhs_node, rhs_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (lhs, rhs) = ops.state;
        let (tl, tr) = (self.transpose_lhs, self.transpose_rhs);
        if let Some(node) = rhs_node {
            let d = if tr {
                B::fast_matmul(grad.clone(), lhs, true, tl)
            } else {
                B::fast_matmul(lhs, grad.clone(), !tl, false)
            };
            grads.register::<B>(node.id, d);
        }
        if let Some(node) = lhs_node {
            let d = if tl {
                B::fast_matmul(rhs, grad, tr, true)
            } else {
                B::fast_matmul(grad, rhs, false, !tr)
            };
            grads.register::<B>(node.id, d);
        }
    }
}

/// Saves the inputs, the output and the log-sum-exp; the backward recomputes the scores.
#[derive(Debug)]
struct AttentionBackward {
    scale: f64,
    block: usize,
}

impl<B: FastOps> Backward<B, 3> for AttentionBackward {
    type State = AttentionSaved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let g = B::attention_backward(ops.state, dout, self.scale, self.block);
        for (node, grad) in [(q_node, g.dq), (k_node, g.dk), (v_node, g.dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FastOps, C: CheckpointStrategy> FastOps for Autodiff<B, C> {
    fn fast_matmul(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        transpose_lhs: bool,
        transpose_rhs: bool,
    ) -> FloatTensor<Self> {
        let backward = MatmulBackward {
            transpose_lhs,
            transpose_rhs,
        };
        match backward
            .prepare::<C>([lhs.node(), rhs.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (l, r) = (lhs.primitive().clone(), rhs.primitive().clone());
                let out = B::fast_matmul(l.clone(), r.clone(), transpose_lhs, transpose_rhs);
                prep.finish((l, r), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_matmul(
                lhs.into_primitive(),
                rhs.into_primitive(),
                transpose_lhs,
                transpose_rhs,
            )),
        }
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
        block: usize,
    ) -> FloatTensor<Self> {
        match (AttentionBackward { scale, block })
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [q, k, v] = [&q, &k, &v].map(|t| t.primitive().clone());
                let fwd = B::attention_forward(q.clone(), k.clone(), v.clone(), scale, block);
                let saved = AttentionSaved {
                    q,
                    k,
                    v,
                    out: fwd.out.clone(),
                    lse: fwd.lse,
                };
                prep.finish(saved, fwd.out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::causal_attention(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                scale,
                block,
            )),
        }
    }
}

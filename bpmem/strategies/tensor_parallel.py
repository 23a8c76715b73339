"""``tensor-parallel``: Megatron-style pairs of Linears over the ranks; every rank runs the whole
batch and the same replicated loss, and each rank's gradient is exact for its shard (no
averaging); s as for FSDP, on the sharded weights.

A colwise Linear shards its weight and bias on the output features, and its output stays
sharded on the feature dim, and so does the elementwise activation; the rowwise Linear after
it shards its weight on the input features, keeps its bias whole, and all-reduces its
partial outputs. With an odd number of Linears the last (the output layer) stays whole.

Prediction, the same on every rank, every figure but the peak exact:

- Parameters, gradients, optimizer state: a colwise Linear keeps fan_out / p rows of its
  weight and bias; a rowwise one fan_in / p columns of its weight and the whole bias.
- Retained activations: the plain step's at the whole batch B, except that what lies between
  a colwise Linear and its rowwise partner is (B, hidden / p): the colwise output (GELU saves
  it) and the activation's output (the rowwise Linear saves it; ReLU, tanh and sigmoid too).
- Traffic: ring all-reduces, 2 (p - 1) / p of the bytes per rank: each rowwise output in
  forward, the gradient of each colwise input in backward (none for X), and each sharded
  weight's square sum for s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bpmem.analytic.rules import chain_costs, loss_saved_bytes, optimizer_state_bytes, parameter_tensors
from bpmem.figures import RankFigures
from bpmem.strategies.base import SplitConfig, strategy

if TYPE_CHECKING:
    from bpmem.spec import MLPSpec, StepSpec


def tensor_parallel_styles(spec: MLPSpec) -> list[str]:
    """How each Linear is split: "colwise", "rowwise", alternating in pairs from the input
    side; with an odd number of Linears the last stays "replicated"."""
    n = spec.depth + 1
    return [("colwise", "rowwise")[j % 2] if j < n - n % 2 else "replicated" for j in range(n)]


@strategy("tensor-parallel", "colwise/rowwise Linear pairs, hidden features split over the ranks (torchrun)",
          mlp_only="colwise/rowwise pairs of its Linears", peak_by_dry_run=True)
class TensorParallel(SplitConfig):
    def check(self, spec: MLPSpec, step: StepSpec) -> None:
        self.check_model(spec)
        if spec.hidden_dim % self.world_size:
            raise ValueError(f"hidden_dim: {spec.hidden_dim} does not split evenly over {self.world_size} ranks "
                             "for tensor-parallel (each rank keeps hidden_dim / world_size features); "
                             "allowed: a multiple of world_size")

    def predict_ranks(self, spec: MLPSpec, step: StepSpec) -> list[RankFigures]:
        s, p, b = spec.itemsize, self.world_size, step.batch_size
        styles = tensor_parallel_styles(spec)
        costs = chain_costs(spec, b)
        params = retained = reduced = 0
        for j, ((fan_in, fan_out), style) in enumerate(zip(spec.layer_dims(), styles, strict=True)):
            weight, bias = fan_in * fan_out, (fan_out if spec.bias else 0)
            if style == "colwise":
                weight, bias = weight // p, bias // p
                reduced += costs.boundary_bytes[j] if j > 0 else 0
            elif style == "rowwise":
                weight //= p
                reduced += b * fan_out * s
            params += (weight + bias) * s
            sharded_input = j > 0 and styles[j - 1] == "colwise"
            retained += costs.boundary_bytes[j] // (p if sharded_input else 1)
            retained += costs.internal_bytes[j] // (p if style == "colwise" else 1)
        retained += loss_saved_bytes(spec, b)
        reduced += sum(style != "replicated" for style in styles) * s
        rank = RankFigures(params_bytes=params, grads_bytes=params,
                           optimizer_bytes=optimizer_state_bytes(step.optimizer, params, parameter_tensors(spec)),
                           saved_activation_bytes=retained, textbook_saved_bytes=retained, bubble_fraction=0.0,
                           comm_bytes=2 * (p - 1) * reduced // p)
        return [rank] * p

    def setup_rank(self, spec: MLPSpec, step: StepSpec, rank: int, device: Any) -> Any:
        from torch import nn
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        from bpmem.models.mlp import as_workload
        from bpmem.strategies.rank_runtime import RankSetup, mesh, objective_step

        workload = as_workload(spec)
        model = workload.build(device, seed=0)
        x, y = workload.make_batch(step.batch_size, device, seed=0)
        linears = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        plan = {name: styles[style]() for name, style in zip(linears, tensor_parallel_styles(spec), strict=True)
                if style in styles}
        parallelize_module(model, mesh(device, self.world_size), plan)
        run = objective_step(spec, model, model, x, y)
        return RankSetup([model], list(model.parameters()), x, y, run, [x, y])

"""The model seam: what bpmem needs of a model to run, measure and predict one step.

Everything above this line (the strategies' runtimes, the probes' steps, the sweep and the
report) asks a ``Workload`` for the model, a batch, the objective and the chain of blocks;
it never asks which model it is. The MLP of the seed (``bpmem.models.mlp.MLP``) is one
implementation; a user's own ``nn.Module`` is another. Nothing here imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from bpmem.spec import MLPSpec


@runtime_checkable
class Workload(Protocol):
    """A model family at one configuration.

    - ``build``: the module, its parameters initialised from ``seed`` so two builds match;
    - ``make_batch``: ``(inputs, target)`` for ``batch_size`` rows; ``inputs`` is a tensor
      or a tuple of tensors, passed to the model positionally;
    - ``forward``: the model's output for a batch's inputs (a tuple is passed positionally);
    - ``data_loss``: L, the batch's mean loss, from the model's output and the target;
    - ``regularizer``: s, a term added to L that needs the model (None when there is none);
    - ``blocks``: the ordered chain that checkpointing and pipelining cut, as lists of
      modules that run one after another (the last block's output is the model's);
    - ``analytic``: the arithmetic model, where one exists (the MLP's ``MLPSpec``), else None.
    """

    name: str

    def build(self, device: Any, seed: int | None = 0) -> Any: ...

    def make_batch(self, batch_size: int, device: Any, seed: int = 0) -> tuple[Any, Any]: ...

    def forward(self, model: Any, inputs: Any) -> Any: ...

    def data_loss(self, output: Any, target: Any) -> Any: ...

    def regularizer(self, model: Any) -> Any: ...

    def blocks(self, model: Any) -> list[list[Any]]: ...

    @property
    def analytic(self) -> MLPSpec | None: ...

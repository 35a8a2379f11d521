"""Two-tower classification of document pairs: the LRA retrieval model (Tay et al., 2021,
"Long Range Arena", section 3.3; the AAN citation task).

One shared encoder (a :class:`~ssmjax.models.SequenceModel` with ``head="pool"``) embeds each
document, ``u = enc(x_1)``, ``v = enc(x_2)``, and a two-layer MLP classifies the pair from

    z = [u, v, u * v, u - v]        logits = W_2 relu(W_1 z + b_1) + b_2

Inputs are the two token sequences side by side, ``[b, 2 L]`` (``x_1 = inputs[:, :L]``,
``x_2 = inputs[:, L:]``), so a pair is one row of an ordinary batch.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float, Int

from ssmjax.models.backbone import SequenceModel


class DualEncoderClassifier(nn.Module):
    """Shared-encoder pair classifier (module docstring). ``encoder``: a ``SequenceModel``
    whose ``head`` is ``"pool"``; ``mlp_dim``: the hidden width of the head."""

    encoder: SequenceModel
    num_classes: int = 2
    mlp_dim: int = 128

    @property
    def vocab_size(self) -> int | None:  # what the training loop's batch checks read
        return self.encoder.vocab_size

    def setup(self):
        if self.encoder.head != "pool":
            raise ValueError(f"encoder: expected a SequenceModel with head='pool', got head={self.encoder.head!r}")
        self.hidden = nn.Dense(self.mlp_dim)
        self.classifier = nn.Dense(self.num_classes)

    def __call__(self, inputs: Int[Array, "b two_l"]) -> Float[Array, "b c"]:
        if inputs.ndim != 2 or inputs.shape[1] % 2:
            raise ValueError(f"inputs: expected [batch, 2 L] (two documents of L tokens side by side), "
                             f"got shape {inputs.shape}")
        half = inputs.shape[1] // 2
        u, v = self.encoder(inputs[:, :half]), self.encoder(inputs[:, half:])
        z = jnp.concatenate([u, v, u * v, u - v], -1)
        return self.classifier(nn.relu(self.hidden(z)))

    def ssm_parameter_mask(self, params):
        """:meth:`SequenceModel.ssm_parameter_mask` over the whole tree (the encoder's mixers'
        SSM parameters; the head has none)."""
        return self.encoder.ssm_parameter_mask(params)

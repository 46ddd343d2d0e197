"""The Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features
with Matryoshka Sparse Autoencoders"; Nabeshima 2024, "Matryoshka Sparse Autoencoders").

A BatchTopK SAE (:mod:`pipeline.sae.archs.batchtopk`) whose nested prefixes of the dictionary, latents
0..m-1 for each m in ``cfg.prefixes`` (the last = n_latents), must each reconstruct the input on their own:

    loss = sum over m of NMSE(x, b_dec + sum_{i < m} z_i W_dec[i])  (+ AuxK)

with z the batch top-k code of the whole dictionary. The losses are summed, as in both papers and in
SAELens's MatryoshkaBatchTopKTrainingSAE (each inner reconstruction loss added to the outer one), so the
first latents, counted in every term, learn the general features and the later ones refine them, which
is what reduces feature absorption. fit adds the whole dictionary's NMSE; the smaller prefixes' are the
loss terms ``prefix_<m>_nmse`` (weight 1), one log.csv column each.

Inference is BatchTopK's, at full size: the one threshold over all latents. :meth:`MatryoshkaSAE.truncate`
gives the SAE of a prefix alone: a BatchTopK SAE of its first m latents with the same threshold, whose code is
the full code restricted to those latents.
"""

from __future__ import annotations

import re

import torch

from pipeline.infra.errors import UserError
from pipeline.sae.archs.batchtopk import BatchTopKSAE
from pipeline.sae.interface import Knobs, LossTerm, SaeConfig, SaeOutput, Step, register
from pipeline.sae.quality import Reconstruction
from pipeline.sae.threshold import restrict

DIVISORS = (16, 8, 4, 2, 1)  # default prefixes: n/16, n/8, n/4, n/2, n


def default_prefixes(n_latents: int) -> list[int]:
    """n/16, n/8, n/4, n/2, n (the sizes below one latent left out)."""
    return sorted({n_latents // d for d in DIVISORS} - {0})


def check_prefixes(prefixes: list[int], n_latents: int) -> list[int]:
    """``prefixes`` when they are increasing positive sizes ending at ``n_latents``, else a UserError."""
    increasing = all(0 < a < b for a, b in zip(prefixes, prefixes[1:]))
    if not prefixes or not increasing or prefixes[0] < 1 or prefixes[-1] != n_latents:
        raise UserError(
            f"matryoshka prefixes {prefixes} must be increasing dictionary sizes ending at the number of latents "
            f"({n_latents}), e.g. {','.join(map(str, default_prefixes(n_latents)))}; fix --prefixes."
        )
    return prefixes


@register("matryoshka", trainable=True)
class MatryoshkaSAE(BatchTopKSAE):
    """A BatchTopK SAE trained so that each prefix of its dictionary reconstructs on its own."""

    def __init__(
        self, cfg: SaeConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__(cfg, generator, device)
        self.prefixes = check_prefixes(cfg.prefixes or default_prefixes(cfg.n_latents), cfg.n_latents)

    @classmethod
    def plan_prefixes(cls, text: str, n_latents: int) -> list[int]:
        """The prefixes from --prefixes ("256,1024,4096"; "/" or spaces also separate them, so a sweep can
        list several), by default n/16, n/8, n/4, n/2, n; checked: increasing, the last = n_latents."""
        if not text.strip():
            return default_prefixes(n_latents)
        try:
            sizes = [int(part) for part in re.split(r"[,/\s]+", text.strip())]
        except ValueError:
            raise UserError(f"--prefixes {text!r} must be whole numbers, e.g. 256,1024,4096.") from None
        return check_prefixes(sizes, n_latents)

    def prefix_nmse(self, out: SaeOutput, size: int, low_precision: bool = False) -> torch.Tensor:
        """() the NMSE of ``out.x`` reconstructed by the latents below ``size`` of ``out``'s training code alone
        (its entries there only: the flat code is cut, not zero-weighted); ``low_precision``: its decode and
        W_dec's gradient from bf16 operands."""
        code = self.training_code(out)
        assert code.pattern is not None
        inner = self.decode_code(restrict(code, code.pattern.latents < size, len(out.x)), low_precision)  # (B, D)
        return Reconstruction().add(out.x, inner)

    def truncate(self, size: int) -> BatchTopKSAE:
        """The SAE of the first ``size`` latents (one of the prefixes), with this one's threshold."""
        if size not in self.prefixes:
            raise UserError(f"prefix {size} is not one of this SAE's prefixes {self.prefixes}.")
        cfg = SaeConfig("batchtopk", self.cfg.d_in, size, min(self.cfg.k, size - 1), self.cfg.layers)
        small = BatchTopKSAE(cfg, device=self.device).to(self.W_enc.dtype)
        state = {
            name: value[:size] if name in ("W_enc", "b_enc", "W_dec") else value
            for name, value in self.state_dict().items()
        }
        small.load_state_dict(state)
        return small.train(self.training)

    # --- training hooks (pipeline.sae.interface.SAE) ---

    def loss_terms(self, out: SaeOutput, step: Step, knobs: Knobs) -> list[LossTerm]:
        low = step.low_precision
        inner = [LossTerm(f"prefix_{m}_nmse", 1.0, self.prefix_nmse(out, m, low)) for m in self.prefixes[:-1]]
        return [*super().loss_terms(out, step, knobs), *inner]

    def log_fields(self) -> list[str]:
        return [*super().log_fields(), *(f"prefix_{m}_nmse" for m in self.prefixes[:-1])]

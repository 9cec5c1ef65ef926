"""ModalTune (method 2): frozen slide encoder + trainable Modal Adapter over modal tokens.

Modal tokens per patient: ``[clinical?, task, gene_1..gene_K]`` (order fixed by ``gene_pe``).
The model runs once per task id (0 General, 1 Diagnosis, 2 Survival) and returns
``{"embedding": (B, num_tasks, output_dim)}``; its only loss is the trainer's text KL
(``objective = "text_kl"``).

Missing modalities (method 6, bug 10): a patient with ``has_genes`` False gets a learned set of
"missing genes" tokens instead of the gene encoder's output, and ``has_clinical`` False a learned
"missing clinical" token; nobody is dropped. These two parameters are the only trainable additions to
the authors' architecture (K*768 + 768 values).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modaltune.errors import InputError
from modaltune.models.adapter import ModalAdapter, init_linear_ln
from modaltune.models.backbones import build_backbone
from modaltune.models.configs import (
    check_config_keys,
    demo_config,
    merge_config,
    modaltune_config,
    modaltune_defaults,
    paper_config,
    titan_config,
)
from modaltune.models.gene_encoder import GeneMixerEncoder
from modaltune.models.registry import ModelDims, register_model

log = logging.getLogger(__name__)

TASK_NAMES = ("General", "Diagnosis", "Survival")
# Task tokens -> which of the four text prompts (General, Diagnosis, Stage, Survival) each one targets.
_TOKENS_BY_NUM_TASKS = {
    1: (("general",), (0,)),
    2: (("general", "diagnosis"), (0, 1)),
    3: (("general", "diagnosis", "survival"), (0, 1, 3)),
    4: (("general", "diagnosis", "stage", "survival"), (0, 1, 2, 3)),
}


class ModalTune(nn.Module):
    """Frozen slide encoder + Modal Adapter + modal tokens. See module docstring and method 2.

    ``frozen_dropout`` (config default False = fixed): False keeps the frozen encoder in eval mode at all
    times; True = the authors' code, whose frozen encoder's dropout and drop-path stay active in training.
    ``double_residual`` (config default False = fixed; True = the authors'): see ``modaltune.models.adapter``.
    """

    objective = "text_kl"

    def __init__(self, cfg: dict, dims: ModelDims):
        super().__init__()
        cfg = modaltune_config(cfg)  # over TITAN's defaults when backbone.type is titan, else GigaPath's
        self.cfg = cfg
        bcfg, acfg, gcfg = cfg["backbone"], cfg["adapter"], cfg["genes"]
        dim = int(bcfg["embed_dim"])
        self.use_clinical = bool(cfg["use_clinical"])
        self.num_tasks = int(cfg["num_tasks"])
        if self.num_tasks not in _TOKENS_BY_NUM_TASKS:
            raise InputError(f"model config num_tasks={self.num_tasks}: use 1-4 task tokens (there are four text "
                             "prompts; the paper: 3 = General, Diagnosis, Survival)")
        # Model facts read by the trainer and the evaluator (no name lists elsewhere).
        self.token_names, self.text_prompt_index = _TOKENS_BY_NUM_TASKS[self.num_tasks]
        self.headline_tokens = {t: n for t, n in (("subtype", "diagnosis"), ("survival", "survival"))
                                if n in self.token_names}
        self.token_agg = cfg["token_agg"]
        self.frozen_dropout = bool(acfg["frozen_dropout"])
        self.grad_checkpointing = bool(cfg["grad_checkpointing"])
        if self.token_agg not in ("sum", "cat"):
            raise InputError(f"model config token_agg={self.token_agg!r}: use 'sum' (GigaPath) or 'cat' (TITAN)")
        if self.use_clinical and dims.clinical_dim <= 0:
            raise InputError("model config use_clinical=true but ModelDims.clinical_dim is 0: build the "
                             "clinical covariates (rule clinical_table) or set use_clinical: false")

        self.backbone = build_backbone(bcfg, dims.feature_dim)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        n_layers = self.backbone.n_layers
        idx = [list(map(int, ab)) for ab in bcfg["interaction_indexes"]]
        if not idx or idx[-1][1] != n_layers - 1 or any(a > b for a, b in idx) or any(
            idx[i + 1][0] != idx[i][1] + 1 for i in range(len(idx) - 1)
        ):
            raise InputError(
                f"model config backbone.interaction_indexes={idx}: need contiguous inclusive ranges ending at "
                f"the last of the {n_layers} encoder layers"
            )

        self.gene_encoder = GeneMixerEncoder(
            dims.pathway_groups, latent_dim=gcfg["latent_dim"], depth=gcfg["depth"],
            token_expansion=gcfg.get("token_expansion", 0.5), channel_expansion=gcfg.get("channel_expansion", 0.5),
            dropout=gcfg["dropout"], out_dim=dim, final_groups=gcfg["final_groups"],
        )
        n_gene_tokens = self.gene_encoder.n_tokens
        self.task_slot = 1 if self.use_clinical else 0
        n_modal = self.task_slot + 1 + n_gene_tokens
        drop_path = acfg.get("drop_path")
        self.adapter = ModalAdapter(
            dim=dim, n_modal_tokens=n_modal, num_heads=acfg["num_heads"], cffn_ratio=acfg["cffn_ratio"],
            drop_path=bcfg["drop_path_rate"] if drop_path is None else drop_path,
            interaction_indexes=idx, double_residual=acfg["double_residual"],
            use_prompt_sa=acfg.get("use_prompt_sa", True),
        )
        self.task_embed = nn.Sequential(nn.Linear(self.num_tasks, dim), nn.LayerNorm(dim))
        self.clinical_embed = (
            nn.Sequential(nn.Linear(dims.clinical_dim, dim // 2), nn.ReLU(), nn.Linear(dim // 2, dim), nn.LayerNorm(dim))
            if self.use_clinical else None
        )
        self.missing_genes = nn.Parameter(torch.zeros(1, n_gene_tokens, dim))
        self.missing_clinical = nn.Parameter(torch.zeros(1, 1, dim)) if self.use_clinical else None
        n_parts = 1 + 1 + 1 + int(self.use_clinical)  # image, task, genes[, clinical]
        head_dim = dim if self.token_agg == "sum" else n_parts * dim
        self.final_norm = nn.LayerNorm(head_dim)
        self.final_project = nn.Linear(head_dim, int(cfg["output_dim"]))
        self.output_dim = int(cfg["output_dim"])
        self._init_trainable()

    @torch.no_grad()
    def _init_trainable(self) -> None:
        for m in (self.gene_encoder, self.task_embed, self.clinical_embed, self.final_norm, self.final_project):
            if m is not None:
                init_linear_ln(m)
        self.gene_encoder.towers.reset_parameters(std=0.02)
        nn.init.trunc_normal_(self.missing_genes, std=0.02)
        if self.missing_clinical is not None:
            nn.init.trunc_normal_(self.missing_clinical, std=0.02)
        # the adapter initialised itself (trunc-normal, xavier attention, gamma 0, gene_pe)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.frozen_dropout:
            self.backbone.eval()
        return self

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the trained parameters (the frozen encoder is reloaded from its checkpoint)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    # ------------------------------------------------------------------ forward
    def _maybe_ckpt(self, fn, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def modal_tokens(self, batch: dict, task_id: int) -> Tensor:
        genes = batch["genes"].to(self.final_project.weight.dtype)
        bsz = genes.shape[0]
        has_genes = batch.get("has_genes")
        g = self.gene_encoder(genes)
        if has_genes is not None:
            g = torch.where(has_genes.view(bsz, 1, 1).to(g.device), g, self.missing_genes.expand_as(g))
        onehot = F.one_hot(torch.full((bsz,), task_id, device=g.device), self.num_tasks).to(g.dtype)
        parts = [self.task_embed(onehot).unsqueeze(1), g]
        if self.use_clinical:
            clin = self.clinical_embed(batch["clinical"].to(g.dtype)).unsqueeze(1)
            has_clin = batch.get("has_clinical")
            if has_clin is not None:
                clin = torch.where(has_clin.view(bsz, 1, 1).to(g.device), clin, self.missing_clinical.expand_as(clin))
            parts.insert(0, clin)
        return torch.cat(parts, dim=1)

    def _block(self, i: int, h: Tensor, c: Tensor, ctx: dict, x_pad: Tensor | None) -> tuple[Tensor, Tensor]:
        blk = self.adapter.blocks[i]
        pe = self.adapter.gene_pe
        c = self._maybe_ckpt(self.adapter.prompt_step, i, c)
        x = self._maybe_ckpt(blk.injector, h[:, 1:], c, pe)
        h = torch.cat([h[:, :1], x], dim=1)
        a, b = self.adapter.interaction_indexes[i]
        for layer in range(a, b + 1):
            h = self._maybe_ckpt(self.backbone.run_layer, layer, h, ctx)
        c = self._maybe_ckpt(blk.extract, c, h[:, 1:], pe, x_pad)
        return h, c

    def forward_tokens(
        self, batch: dict, task_id: int, features: Tensor, coords: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, dict]:
        """Run encoder + adapter for one task id -> (image tokens h, modal tokens c, backbone context)."""
        h, ctx = self.backbone.prepare(features, coords, mask)
        token_mask = ctx.get("token_mask")
        x_pad = None if token_mask is None else ~token_mask
        c = self.modal_tokens(batch, task_id)
        for layer in range(self.adapter.interaction_indexes[0][0]):
            h = self._maybe_ckpt(self.backbone.run_layer, layer, h, ctx)
        for i in range(len(self.adapter.blocks)):
            h, c = self._block(i, h, c, ctx, x_pad)
        return h, c, ctx

    def forward_task(self, batch: dict, task_id: int, features: Tensor, coords: Tensor, mask: Tensor | None) -> Tensor:
        h, c, ctx = self.forward_tokens(batch, task_id, features, coords, mask)
        img = self.backbone.image_vector(h, ctx)
        task_out = c[:, self.task_slot]
        gene_out = c[:, self.task_slot + 1:].mean(1)
        parts = [img, task_out, gene_out] + ([c[:, 0]] if self.use_clinical else [])
        z = torch.stack(parts, 0).sum(0) if self.token_agg == "sum" else torch.cat(parts, dim=-1)
        return self.final_project(self.final_norm(z))

    def inputs(self, batch: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        """features, coords, patch_mask from the batch; real patches moved first; mask None if all real."""
        dtype = self.final_project.weight.dtype
        features = batch["features"].to(dtype)
        coords = batch["coords"].to(dtype)
        mask = batch.get("patch_mask")
        if features.dim() != 3 or coords.shape[:2] != features.shape[:2]:
            raise InputError(f"batch['features'] {tuple(features.shape)} / batch['coords'] {tuple(coords.shape)}: "
                             "expected (B, N, D) and (B, N, 2)")
        if mask is not None:
            mask = mask.bool()
            if bool(mask.all()):
                mask = None
            else:
                # Real patches first, so each patient's tokens form a prefix (see DilatedSelfAttention).
                order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
                features = torch.gather(features, 1, order.unsqueeze(-1).expand_as(features))
                coords = torch.gather(coords, 1, order.unsqueeze(-1).expand_as(coords))
                mask = torch.gather(mask, 1, order)
                if not bool(mask.any(1).all()):
                    raise InputError("batch['patch_mask']: a patient has no real patch; drop it in the dataset")
        return features, coords, mask

    def forward(self, batch: dict) -> dict[str, Tensor]:
        features, coords, mask = self.inputs(batch)
        out = [self.forward_task(batch, t, features, coords, mask) for t in range(self.num_tasks)]
        return {"embedding": torch.stack(out, dim=1)}

    @torch.no_grad()
    def tile_scores(self, batch: dict) -> dict[str, Tensor]:
        """Contract C5: per-patch scores (B, N) from the Extractors' cross-attention (image -> modal).

        In every Extractor the modal tokens are the queries and the image tokens the keys, so its
        softmax weights say which tiles each modal token reads. Per task pass t the score of a tile is
        the weight of that pass's task token onto it, averaged over heads and over all Extractors of
        the adapter (keys "general", "diagnosis", "survival"); "modal_tokens" averages every modal token
        (task, genes[, clinical]) over all passes. Scores come back in the batch's patch order with NaN
        on padded slots. Needs one image token per patch (LongNet; TITAN's grid tokens are refused).
        """
        feats_in = batch["features"]
        orig_mask = batch.get("patch_mask")
        orig_mask = (torch.ones(feats_in.shape[:2], dtype=torch.bool, device=feats_in.device) if orig_mask is None
                     else orig_mask.bool())
        features, coords, mask = self.inputs(batch)
        order = torch.argsort((~orig_mask).to(torch.int8), dim=1, stable=True)  # what inputs() applied
        captured: list[Tensor] = []

        def hook(module, args, kwargs, _output):
            captured.append(module.attention_weights(args[0], args[1], query_pos=kwargs.get("query_pos"),
                                                     key_padding_mask=kwargs.get("key_padding_mask")))

        crosses = [ex.cross for blk in self.adapter.blocks for ex in (blk.extractor, *blk.extra_extractors)]
        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in crosses]
        out: dict[str, Tensor] = {}
        modal = []
        try:
            for t in range(self.num_tasks):
                captured.clear()
                self.forward_tokens(batch, t, features, coords, mask)
                w = torch.stack(captured).mean(0).float()  # (B, n_modal, N_tokens)
                if w.shape[-1] != features.shape[1]:
                    raise InputError(f"ModalTune tile scores: the backbone has {w.shape[-1]} image tokens for "
                                     f"{features.shape[1]} patches; heatmaps need one token per patch (LongNet)")
                name = TASK_NAMES[t].lower() if t < len(TASK_NAMES) else f"task_{t}"
                out[name] = w[:, self.task_slot]
                modal.append(w.mean(1))
        finally:
            for h in handles:
                h.remove()
        out["modal_tokens"] = torch.stack(modal).mean(0)
        # Back to the batch's patch order (inputs() moved real patches first), NaN on padding.
        res = {}
        for k, v in out.items():
            back = torch.empty_like(v).scatter_(1, order, v)
            res[k] = back.masked_fill(~orig_mask, float("nan"))
        return res


@register_model("modaltune")
def build_modaltune(cfg: dict, dims: ModelDims) -> ModalTune:
    """Registry builder: ``cfg`` is overlaid on ``paper_config()`` (``titan_config()`` for a TITAN backbone)."""
    check_config_keys(cfg, modaltune_defaults(cfg))
    return ModalTune(cfg, dims)


# Re-exported: the configurations live in modaltune.models.configs.
__all__ = ["TASK_NAMES", "ModalTune", "build_backbone", "build_modaltune", "demo_config", "merge_config",
           "modaltune_config", "paper_config", "titan_config"]

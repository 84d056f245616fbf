"""Run under torchrun (2 processes, gloo): exercises kdtune.training.distributed on a tiny self-contained decoder.

Writes ``<out>/rank<r>.json`` with measured differences against a single-process float reference; the pytest side
(test_distributed_core.py) asserts on them. Uses its own toy ModelFamily so it does not depend on kdtune.models.
"""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kdtune.models._family import ModelFamily, register_family
from kdtune.training import distributed as D
from kdtune.training.runtime import clip_grad_norm

VOCAB, DIM, LAYERS = 37, 12, 2  # odd sizes: uneven FSDP shards (37 rows over 2 ranks)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc = nn.Linear(DIM, DIM)
        self.register_buffer("scale", torch.empty(DIM), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.scale.copy_(torch.linspace(0.5, 1.5, DIM, device=self.scale.device))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        return h + torch.tanh(self.fc(self.norm(h))) * self.scale


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.hf_family = "toy"
        self.hf_config = {"architectures": ["ToyForCausalLM"], "model_type": "toy"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, V]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(h)


class ToyFamily(ModelFamily):
    name = "toy"
    hf_architectures = ("ToyForCausalLM",)
    hf_model_types = ("toy",)

    def build(self, hf_config, **lora_kwargs):
        return Toy()

    def state_dict_from_hf(self, hf_state, hf_config):
        return {k.removeprefix("model."): v for k, v in hf_state.items()}

    def state_dict_to_hf(self, state, hf_config):
        return {f"model.{k}": v for k, v in state.items()}

    def module_name_to_hf(self, name):
        return f"model.{name}"


register_family(ToyFamily())


def token_loss_sum(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits = model(tokens)[:, :-1].float()  # [B, T-1, V]
    tgt = labels[:, 1:]
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((tgt != -100).sum())


def main(out: Path) -> None:
    faulthandler.dump_traceback_later(200, exit=False)  # stacks of a hang, before the test's timeout
    env = D.init_distributed("cpu")
    r, W = env.rank, env.world_size
    res: dict = {"rank": r, "world_size": W, "backend": env.backend, "device": str(env.device)}

    # --- reference model + HF-style checkpoint in two shard files (written by rank 0)
    torch.manual_seed(0)
    ref = Toy()
    ckpt = out / "ckpt"
    if r == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
        hf = {f"model.{k}": v.contiguous() for k, v in ref.state_dict().items()}
        keys = sorted(hf)
        half = len(keys) // 2
        save_file({k: hf[k] for k in keys[:half]}, str(ckpt / "model-00001-of-00002.safetensors"))
        save_file({k: hf[k] for k in keys[half:]}, str(ckpt / "model-00002-of-00002.safetensors"))
        weight_map = {
            k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
            for i, k in enumerate(keys)
        }
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (ckpt / "config.json").write_text(json.dumps(ref.hf_config))
    D.barrier()

    # --- meta build, shard, materialise, load shard file by shard file
    with torch.device("meta"):
        model = Toy()
    D.shard_model(model, device="cpu")
    D.materialize_meta_model(model, "cpu")
    not_loaded = D.load_hf_into_sharded_model(model, ckpt)
    res["not_loaded"] = not_loaded
    res["param_is_dtensor"] = type(model.output.weight).__name__
    res["local_rows_output"] = int(model.output.weight.to_local().shape[0])
    full = D.gather_full_state_dict(model)
    if r == 0:
        res["gather_max_diff"] = max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items())
        res["gather_keys_equal"] = sorted(full) == sorted(ref.state_dict())
    res["buffer_diff"] = (model.layers[0].scale - ref.layers[0].scale).abs().max().item()

    # --- global token normalisation: uneven valid-token counts per rank
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (4, 9), generator=g)
    labels = tokens.clone()
    labels[0, :6] = -100
    labels[3, 2:] = -100
    labels[2, :3] = -100
    mine = slice(r * 4 // W, (r + 1) * 4 // W)
    loss_sum, n_local = token_loss_sum(model, tokens[mine], labels[mine])
    loss_sum.backward()
    sums = D.all_reduce_sum([loss_sum.item(), n_local])
    global_tokens = sums[1].item()
    scale = D.global_grad_scale(global_tokens)
    for p in model.parameters():
        p.grad.mul_(scale)
    ref_loss, n_ref = token_loss_sum(ref, tokens, labels)
    (ref_loss / n_ref).backward()
    res["tokens_local"] = n_local
    res["tokens_global"] = global_tokens
    res["tokens_ref"] = n_ref
    res["loss_diff"] = abs(sums[0].item() / global_tokens - (ref_loss / n_ref).item())
    res["grad_max_diff"] = max(
        (p.grad.full_tensor() - rp.grad).abs().max().item() for p, rp in zip(model.parameters(), ref.parameters())
    )
    # --- clipping on DTensor grads
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    norm = clip_grad_norm(model, 0.05)  # the helper every recipe uses, on DTensor grads
    res["norm_type"] = type(norm).__name__
    res["norm"] = float(norm)
    res["norm_ref"] = ref_norm.item()
    res["clipped_grad_max_diff"] = max(
        (p.grad.full_tensor() - rp.grad).abs().max().item() for p, rp in zip(model.parameters(), ref.parameters())
    )

    # --- optimizer step, sharded checkpoint, resume
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt.step()
    ref_opt.step()
    ckdir = out / "checkpoints"
    for step in (1, 2, 3):
        D.save_sharded_checkpoint(ckdir, step, model, opt, {"epoch": 0, "note": f"s{step}"}, keep_last=2)
    res["ckpt_dirs"] = sorted(p.name for p in ckdir.iterdir())
    res["latest"] = D.latest_sharded_checkpoint(ckdir).name
    saved_after = {k: v.clone() for k, v in D.gather_full_state_dict(model).items()}
    rng_expected = torch.rand(3)  # what the RNG yields right after the save
    # perturb, then restore
    opt.step()
    torch.rand(5)
    state = D.load_sharded_checkpoint(D.latest_sharded_checkpoint(ckdir), model, opt)
    res["resumed_state_note"] = state["note"]
    res["rng_restored"] = bool(torch.equal(torch.rand(3), rng_expected))
    restored = D.gather_full_state_dict(model)
    if r == 0:
        res["resume_param_diff"] = max((restored[k] - v).abs().max().item() for k, v in saved_after.items())
    # both continue one more step and must agree with the reference
    loss_sum, n_local = token_loss_sum(model, tokens[mine], labels[mine])
    opt.zero_grad()
    loss_sum.backward()
    sums = D.all_reduce_sum([loss_sum.item(), n_local])
    for p in model.parameters():
        p.grad.mul_(D.global_grad_scale(sums[1].item()))
    opt.step()
    ref_opt.zero_grad()
    rl, rn = token_loss_sum(ref, tokens, labels)
    (rl / rn).backward()
    ref_opt.step()
    res["loss2_diff"] = abs(sums[0].item() / sums[1].item() - (rl / rn).item())
    after2 = D.gather_full_state_dict(model)
    if r == 0:
        res["step2_param_diff"] = max((after2[k] - v).abs().max().item() for k, v in ref.state_dict().items())
    (out / f"rank{r}.json").write_text(json.dumps(res))
    D.destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Train, test, attack and certify one configuration; write metrics.json in the run directory.

    python experiments/train.py                                  # digits, simple_conv, FastClip at 1.0
    python experiments/train.py clip=gouk clip.target=0.5 bn=clipped model.batchnorm=true
    python experiments/train.py -m clip=fastclip,gouk,miyato clip.target=0.5,1.0
    python experiments/train.py experiment=resnet18_cifar10 trainer=gpu
    python experiments/train.py certify.eps=[0.25,0.5] certify.pgd_l2.steps=50   # or certify=none

After testing, the group ``certify`` (conf/certify/) adds the network's Lipschitz bound (``lipschitz``: certified
``upper``, empirical ``lower``), the certified accuracy at each radius (``certified_acc``) and the accuracy under
PGD-ℓ2 at the same radii (``pgd_l2_acc``), keyed by the radius (``"0.1"``).

A run relaunched with the same output directory (``hydra.run.dir=<dir>``) resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from lightning_specclip import SpectralClipCallback
from lightning_specclip.attacks import evaluate_under_attack
from lightning_specclip.lipschitz import CertifiedAccuracy, UnsupportedNodeError
from lightning_specclip.module import ImageClassifier
from lightning_specclip.spectral import eval_mode
from lightning_specclip.tracking import EpochTimer, SpectralHistory, spectral_norms

log = logging.getLogger(__name__)
CONF = str(Path(__file__).resolve().parent.parent / "conf")


def _attack_factories(cfg: DictConfig) -> dict[str, Any]:
    # partial, not lambda: the factories must pickle for ddp_spawn
    return {name: partial(instantiate, c) for name, c in (cfg.get("attack") or {}).items()}


def _one(callbacks: list[Callback], kind: type[Callback]) -> Any:
    """The callback of type ``kind`` among the configured ones (``None`` if there is none)."""
    found = [c for c in callbacks if isinstance(c, kind)]
    if len(found) > 1:
        raise ValueError(f"callbacks holds {len(found)} {kind.__name__}s; metrics.json reads one")
    return found[0] if found else None


def _history(history: SpectralHistory | None) -> dict[str, Any] | None:
    """The spectral history, from the file rank 0 wrote (``ddp_spawn`` trains in worker processes) or memory."""
    if history is None:
        return None
    # absent when the fit had nothing left to do (a finished run relaunched): then nothing was recorded
    if history.save_to is not None and history.save_to.exists():
        return json.loads(history.save_to.read_text())
    return history.history


def _last_checkpoint(directory: Path) -> str | None:
    last = directory / "last.ckpt"
    return str(last) if last.exists() else None


def _certify(
    cfg: DictConfig, net: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> dict[str, Any]:
    """Lipschitz bound, certified accuracy and PGD-ℓ2 accuracy at the radii ``cfg.eps`` (``conf/certify/``).

    On rank 0 alone (nothing is synchronized), over the first ``cfg.batches`` test batches (all if ``None``):
    both accuracies on the same samples, the network in eval mode (BatchNorm running statistics, as the bound
    assumes). At ``ε = 0`` both are the clean accuracy of those samples.
    """
    radii = [float(e) for e in (cfg.eps if OmegaConf.is_list(cfg.eps) else [cfg.eps])]
    keys = [f"{e:g}" for e in radii]
    probe = next(iter(loader))[0].to(device)
    try:
        bound = instantiate(cfg.bound)(net, input_shape=tuple(probe.shape[1:]), data=probe)
    except UnsupportedNodeError as err:  # a model the bound has no rule for: say so, keep the run's other metrics
        log.warning("No Lipschitz bound, so no certified accuracy: %s", err)
        return {"lipschitz": None, "lipschitz_error": str(err)}
    # counted on rank 0 only: no sync, which would wait for the other ranks
    certified = CertifiedAccuracy(lipschitz=bound.upper, eps=radii, sync_on_compute=False).to(device)
    with torch.no_grad(), eval_mode(net):
        for inputs, targets in islice(loader, cfg.batches):
            certified.update(net(inputs.to(device)), targets.to(device))
    out: dict[str, Any] = {
        "lipschitz": {"upper": float(bound.upper), "lower": float(bound.lower)},
        "certified_acc": dict(zip(keys, map(float, certified.compute().tolist()), strict=True)),
    }
    if cfg.pgd_l2 is not None:
        out["pgd_l2_acc"] = {
            key: evaluate_under_attack(
                net,
                instantiate(cfg.pgd_l2, model=net, eps=eps, alpha=cfg.relative_alpha * eps) if eps > 0 else None,
                loader,
                device,
                max_batches=cfg.batches,
                sync=False,
            )
            for key, eps in zip(keys, radii, strict=True)
        }
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test, attack and certify the configured model; return (and write) the metrics.

    Args:
        cfg: the composed config (see ``conf/train.yaml``).

    Returns:
        dict[str, Any]: the content of ``metrics.json``.
    """
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model)
    module = ImageClassifier(net, num_classes=cfg.data.num_classes, attacks=_attack_factories(cfg), **cfg.module)
    callbacks: list[Callback] = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    clip = _one(callbacks, SpectralClipCallback)
    history, timer, checkpoints = (_one(callbacks, kind) for kind in (SpectralHistory, EpochTimer, ModelCheckpoint))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    resume = _last_checkpoint(Path(checkpoints.dirpath)) if cfg.resume and checkpoints is not None else None
    if resume:
        log.info("Resuming from %s", resume)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    metrics: dict[str, Any] = {}
    if trainer.is_global_zero:
        if datamodule.test_set is None:  # ddp_spawn: setup, fit and test ran in the worker processes
            datamodule.setup("test")
        example = next(iter(datamodule.test_dataloader()))[0][:1].to(module.device)
        norms = spectral_norms(module, example)
        method = clip.options["method"].name if clip is not None else None
        certify, started = cfg.get("certify"), time.perf_counter()
        certified = _certify(certify, module.net, datamodule.test_dataloader(), module.device) if certify else {}
        certify_s = time.perf_counter() - started
        metrics = {
            "method": method,
            "target": None if method in (None, "none") else cfg.clip.target,
            "bn_mode": cfg.bn_mode,
            "model": cfg.model._target_.rsplit(".", 1)[-1],
            "data": cfg.data._target_.rsplit(".", 1)[-1],
            "seed": cfg.seed,
            "test_acc": tested["test/acc"],
            "robust_acc": {name: tested[f"test/robust_acc/{name}"] for name in module.attack_factories},
            **certified,  # lipschitz, certified_acc, pgd_l2_acc
            "spectral_norm": norms["layers"],
            "spectral_norm_composition": norms["compositions"],
            "spectral_norm_batchnorm": norms["batchnorms"],
            # absent when the fit had nothing left to do (a finished run relaunched): then nothing was recorded
            "history": _history(history),
            "epoch_time_s": sum(timer.times) / len(timer.times) if timer is not None and timer.times else None,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("test_acc=%.4f robust_acc=%s", metrics["test_acc"], metrics["robust_acc"])
        if certified.get("lipschitz"):
            log.info(
                "certified in %.1f s: lipschitz=%s certified_acc=%s pgd_l2_acc=%s",
                certify_s,
                certified["lipschitz"],
                certified["certified_acc"],
                certified.get("pgd_l2_acc"),
            )
    for logger in loggers:  # Lightning leaves a W&B run open: the next job of a multirun in this process would reuse it
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    return metrics


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the clean test accuracy (the value sweepers optimize).

    Args:
        cfg: the composed config.

    Returns:
        float | None: test accuracy on rank 0.
    """
    torch.set_float32_matmul_precision("high")
    metrics = run(cfg)
    log.info("Run directory: %s", HydraConfig.get().runtime.output_dir)
    return metrics.get("test_acc")


if __name__ == "__main__":
    main()

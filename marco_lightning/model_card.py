"""final_model/README.md: how the model was made and what it measured, so a model pushed to the hub carries its
evidence. The header (base model, tags, datasets) goes through sentence-transformers' model card data."""
from __future__ import annotations

import subprocess
from pathlib import Path

from omegaconf import DictConfig

from marco_lightning.config import ROOT


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def card_data(model, cfg: DictConfig, trained: bool = True) -> None:
    """Fill sentence-transformers' card data of `model` before it is saved (the card it writes from it); trained=False:
    the starting model, kept unchanged (task.keep_start)."""
    st = getattr(model, "st", None)
    if st is None:
        return
    st._model_card_text = None  # a card loaded with the base model describes the base model, not this one
    data = st.model_card_data
    if not cfg.model.get("random_init"):
        data.base_model = cfg.model.backbone
    data.model_name = (f"{Path(cfg.model.backbone).name} trained with marco-lightning "
                       f"({cfg.loss._target_.rsplit('.', 1)[1]})" if trained else
                       f"{Path(cfg.model.backbone).name}, unchanged (marco-lightning's training did not improve it)")
    data.tags = sorted({*(data.tags or []), "marco-lightning", "ms-marco", "passage-retrieval"})


def training_section(cfg: DictConfig, source, metrics: dict, steps: int, model, loss, trained: bool = True) -> str:
    """Markdown: recipe, data, negatives, steps, seed, commit, and before/after with their protocol. The similarity,
    prompts and scale are the trained model's and loss's own (a null in the config stands for a resolved value).
    trained=False: the card of the starting model, kept (task.keep_start) because training did not improve val."""
    settings = {**{k: v for k, v in cfg.loss.items() if k != "_target_"}, "scale": loss.scale}
    scores = (f"similarity `{model.similarity}` (declared in config_sentence_transformers.json, used by "
              "`model.similarity`)" if model.similarity else "scores: the cross-encoder's logit")
    prompts = getattr(model, "prompts", None) or {}
    whose = "as trained" if trained else "the model's own"
    prompt_line = (f"- Prompts: query {prompts.get('query')!r}, document {prompts.get('document')!r}, {whose} "
                   "(declared in config_sentence_transformers.json `prompts`: `encode_query` / `encode_document` "
                   "apply them)")
    prompt_lines = [prompt_line] if any(prompts.values()) else []
    neg = cfg.negatives
    refit = metrics.get("refit")
    shown = metrics["selection"] if refit else metrics  # a refit has no val numbers: its selection run's
    rows = [(name, shown[name]) for name in ("before", "after", "teacher") if name in shown]
    measures = list(dict.fromkeys(m for _, values in rows for m in values))
    table = ["| | " + " | ".join(measures) + " |", "|---|" + "---:|" * len(measures)]
    table += [f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in measures) + " |" for name, values in rows]
    base = f"- Base model: `{cfg.model.backbone}`" + (" (random initialisation)" if cfg.model.get("random_init") else "")
    systems = neg.systems if isinstance(neg.systems, str) else list(neg.systems)
    data, val_queries = source.describe()
    teacher = getattr(source, "teacher_scores", None)
    if loss.needs_teacher and teacher:  # only a distilling loss trained on them
        data += f"; teacher scores `{Path(str(teacher)).name}`"
    protocol = (f"Re-ranking the top {source.val_top_k} of `{Path(str(source.val_run)).name}` for the queries of "
                f"{val_queries}; nDCG with graded gains, MRR and recall count grade >= "
                f"{source.val_rel_level} relevant; every judged query counts (ir-measures). \"before\" is the base "
                "model as sentence-transformers loads it; \"after\" is this model (the checkpoint chosen by "
                f"`{cfg.monitor}`).")
    if refit:
        protocol = (f"**This model has no held-out validation number.** It is a refit (`task.refit=true`): a fresh "
                    f"model trained on the training and the validation queries for {refit['epochs']} epoch(s), the "
                    f"budget validation chose in a run on the training queries alone. The table is that selection "
                    f"run's: \"after\" is its model (the checkpoint chosen by `{cfg.monitor}`, epoch "
                    f"{metrics['selection']['epochs']}), not this one. Measure this model on a test split.\n\n"
                    + protocol.replace('"after" is this model', '"after" is the selection run\'s model'))
    if not trained:
        key = cfg.monitor.removeprefix("val/")
        protocol = (f"**This is the starting model, unchanged.** The training run below did not improve its "
                    f"validation {key} ({metrics['before'][key]:.4f} before, {metrics['after'][key]:.4f} after), so the "
                    "run kept the model it started from (`task.keep_start`); the trained model is the run's "
                    "`trained_model/`. \"before\" is this model.\n\n" + protocol.replace('"after" is this model',
                                                                                    '"after" is the trained model'))
    return "\n".join([
        "", "## How this model was made (marco-lightning)", "", base,
        f"- Loss: `{cfg.loss._target_}` with {settings}; {scores}", *prompt_lines,
        f"- Data: {data}",
        (f"- Hard negatives: systems {systems}, up to {neg.num_per_system} per system, ce_score_margin "
         f"{neg.ce_score_margin}, {cfg.num_negatives} per query per step" + refreshed(metrics.get("refresh"))),
        (f"- Steps: {steps}{epochs_clause(metrics.get('epochs'))}, batch size {cfg.batch_size} per device, lr "
         f"{cfg.optimizer.lr}, seed {cfg.seed}, precision {cfg.trainer.precision}"),
        f"- marco-lightning commit: `{git_commit()}`",
        "", "### Validation", "", protocol, "", *table, ""])


def epochs_clause(epochs: dict | None) -> str:
    """Which epoch the exported checkpoint is, of how many trained (metrics.json "epochs")."""
    if not epochs:
        return ""
    ended = "early stopping on val ended the run" if epochs["stopped_early"] else "the best by val"
    limit = f", up to {epochs['max']}" if (epochs["max"] or 0) > 0 else ""  # max_epochs -1: trainer.max_steps ends it
    return f" (epoch {epochs['best']} of the {epochs['trained']} trained{limit}: {ended})"


def refreshed(refresh: dict | None) -> str:
    """The refreshes of the run's negatives (negatives.refresh), in a clause."""
    if not refresh:
        return ""
    done = ", ".join(f"before epoch {h['epoch']} ({h['changed_share']:.0%} new)" for h in refresh["history"])
    return (f"; re-mined by the model itself every {refresh['every_n_epochs']} epoch(s) (ANCE-style): "
            f"{done or 'none was due'}")

"""task.candidates: one command trains several variants of a recipe one after the other, each in its own run folder
(`candidates/<name>/`), and exports the best by val as `final_model/`. A variant is a list of `key=value`
overrides of the composed config, e.g. with and without the mined negative:

    task.candidates: {mined: [], in_batch: [loss.num_hard_negatives=0]}

Each candidate's value is the val number of the model it trained (the best epoch's, "after"; under task.refit the
selection run's), also where task.keep_start then exported the start: the candidates are recipes, ranked by what
they train; whether the chosen one beat its start is its own run's task.keep_start. (A fold where every candidate
fell below the start would otherwise rank them all at the start's number: CISI's folds 1 and 2 did.) Ties go to
the first listed. Candidates whose overrides change the start's val (model.max_query_length, say) compare the
models they exported instead.

A val split of a few queries cannot choose (CISI's 4 ranked two candidates in the reverse of their test order). With
task.folds=k (a BEIR folder without a val split file) each candidate also trains k-1 more times, each holding out
another share of the training queries (data.val_fold=1..k-1, in `candidates/<name>/folds/<f>/`), and its value is the
mean over the k folds: k times the val queries for k times the training. The model exported is still fold 0's, the
run on the default split.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from marco_lightning.config import check_training_config
from marco_lightning.data.sources import build_source
from marco_lightning.errors import ConfigError


def candidate_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """name -> the run's config with that candidate's overrides, its own output folder, and no candidates; a key that
    does not exist or names a config group fails here, before any data loads."""
    candidates = cfg.task.candidates
    if not isinstance(candidates, DictConfig) or not candidates:
        raise ConfigError(f"task.candidates={candidates}: a mapping of names to override lists, e.g. "
                          "'{mined: [], in_batch: [loss.num_hard_negatives=0]}', or null (train the recipe alone)")
    if cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path with task.candidates: resume the interrupted candidate alone, from its folder "
                          "(ckpt_path=RUN/candidates/NAME, with that candidate's overrides and task.candidates=null)")
    run_dir = Path(cfg.paths.output_dir)
    configs = {}
    for name, overrides in candidates.items():
        where = f"task.candidates.{name}"
        if not OmegaConf.is_list(overrides) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ConfigError(f"{where}={overrides}: a list of key=value overrides ([] for the recipe as configured)")
        for override in overrides:
            key, value = override.split("=", 1)
            bare = key.lstrip("+")
            if bare.split(".")[0] in FIXED or bare in FIXED:
                raise ConfigError(f"{where}: {override!r} changes what the candidates are compared on or where "
                                  "they run (task, paths, data, monitor, devices); a candidate varies the recipe")
            exists = _node(cfg, bare) is not _ABSENT
            if key.startswith("+") and not key.startswith("++") and exists:
                raise ConfigError(f"{where}: {override!r} adds a key that is already set: drop the '+'")
            if not key.startswith("+") and not (_is_setting(cfg, bare) or (exists and value == "null")):
                raise ConfigError(f"{where}: {override!r} names no setting of this config (a config group choice "
                                  "such as loss=mnrl cannot change within one run: sweep it with -m, then "
                                  "task=report; a list is set whole: key=[a,b])")
        candidate = copy.deepcopy(cfg)
        with open_dict(candidate):
            candidate.merge_with(OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
            candidate.paths.output_dir = str(run_dir / "candidates" / name)
            candidate.task.candidates = candidate.task.folds = None
            candidate.task.push_to_hub = None  # only the chosen model is pushed, at the end
        configs[name] = candidate
    return configs


def fold_configs(candidate: DictConfig, folds: int) -> list[DictConfig]:
    """The runs behind a candidate's value: itself (fold 0) and, with task.folds=k, the same recipe holding out
    folds 1..k-1 of the training queries instead, in its folds/<f>/ (no refit, no push: only their val counts)."""
    runs = [candidate]
    for fold in range(1, folds):
        run = copy.deepcopy(candidate)
        with open_dict(run):
            run.data.val_fold = fold
            run.paths.output_dir = str(Path(candidate.paths.output_dir) / "folds" / str(fold))
            run.task.refit = False
        runs.append(run)
    return runs


def check_folds(cfg: DictConfig) -> int:
    """task.folds: null or 1 (the val split alone), or k >= 2 folds the training queries make (read here, before
    anything trains)."""
    folds = cfg.task.get("folds") or 1
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise ConfigError(f"task.folds={cfg.task.folds}: a number of folds >= 2 (null: the val split alone)")
    if folds > 1:
        if cfg.data.get("val_fold") != 0:  # absent (not a BEIR folder) or already set
            raise ConfigError(f"task.folds={folds} needs data=beir (data.val_fold: 0) and sets data.val_fold itself")
        folder = build_source(cfg.data).folder
        if folder.has_split_file(folder.split_names["val"]):
            raise ConfigError(f"task.folds={folds}: {folder.root} has qrels/{folder.split_names['val']}.tsv, a val "
                              "split of its own; folds are shares of the training queries: set task.folds=null")
        available = folder.num_folds()
        if folds > available:
            raise ConfigError(f"task.folds={folds}: {available} folds of data.val_fraction={folder.val_fraction} fit "
                              f"the training queries of {folder.root}: use task.folds<={available} (or lower "
                              "data.val_fraction)")
    return folds


# the same for every candidate: what they are compared on (the val split, the monitored metric) and where they run
FIXED = ("task", "paths", "hydra", "data", "monitor", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
         "trainer.accelerator")
_ABSENT = object()


def _node(cfg: DictConfig, key: str):
    """The config node at `key`, read without resolving it (data.root may fetch a dataset); _ABSENT if none."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node.keys():  # noqa: SIM118 (`in node` resolves the value)
            node = node._get_node(part)
        else:
            return _ABSENT
    return node


def _is_setting(cfg: DictConfig, key: str) -> bool:
    """`key` names a value of cfg (a leaf or a list), not a config section."""
    node = _node(cfg, key)
    return node is not _ABSENT and not isinstance(node, DictConfig)


def trained_value(metrics: dict, key: str) -> float:
    """The val number of the model a run trained: its best epoch's (the selection run's under task.refit)."""
    return metrics.get("selection", metrics)["after"][key]


def final_value(metrics: dict, key: str) -> float:
    """The val number of the model a run exported: the start's where task.keep_start kept it."""
    return metrics.get("selection", metrics)["before" if metrics.get("final_model") == "start" else "after"][key]


def choose(cfg: DictConfig, train, push) -> dict:
    """Train every candidate with `train` (tasks.train.main), copy the best one's final_model/ to the run folder
    (and `push` it to task.push_to_hub)."""
    # Lightning: an 8 s import a config error does not wait for
    from pytorch_lightning.utilities import rank_zero_only

    configs = candidate_configs(cfg)
    folds = check_folds(cfg)
    for config in configs.values():  # every candidate's incompatible choices fail before the first one trains
        for run in fold_configs(config, folds):
            check_training_config(run)
    key, run_dir = cfg.monitor.removeprefix("val/"), Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    runs, table = {}, {}
    for i, (name, config) in enumerate(configs.items(), 1):
        overrides = list(cfg.task.candidates[name])
        print(f"Candidate {i}/{len(configs)} {name!r}: {' '.join(overrides) or 'the recipe as configured'}")
        start = time.perf_counter()
        runs[name] = []  # fold 0's first: the run whose final_model/ is exported
        for fold, run in enumerate(fold_configs(config, folds)):
            if folds > 1:
                print(f"Candidate {name!r}, fold {fold + 1}/{folds}")
            runs[name].append(train(run))
        exported = runs[name][0].get("final_model") or ("refit" if "refit" in runs[name][0] else "trained")
        table[name] = {"overrides": overrides, "final_model": exported, "run": f"candidates/{name}",
                       "seconds": round(time.perf_counter() - start, 1)}
    # candidates with one start rank by what they trained; overrides that change the start (its val differs)
    # compare the exported models, so a trained one that beat a weaker start cannot win over a stronger start kept
    starts = {json.dumps([m.get("selection", m).get("before") for m in r], sort_keys=True) for r in runs.values()}
    value = trained_value if len(starts) == 1 else final_value
    for name, fold_metrics in runs.items():
        values = [value(m, key) for m in fold_metrics]
        table[name].update(val=sum(values) / len(values), **({"val_folds": values} if folds > 1 else {}))
    chosen = max(table, key=lambda n: table[n]["val"])  # the first of equals: max keeps the first maximum
    results = {name: r[0] for name, r in runs.items()}
    metrics = {**results[chosen], "candidates": table, "chosen": chosen}
    for where in (metrics, metrics.get("selection", {})):  # the chosen run's checkpoint, from this run folder
        if where.get("best_checkpoint"):
            where["best_checkpoint"] = f"candidates/{chosen}/{where['best_checkpoint']}"
    if rank_zero_only.rank == 0:
        final = run_dir / "final_model"
        shutil.copytree(run_dir / "candidates" / chosen / "final_model", final)
        with open(final / "README.md", "a", encoding="utf-8") as card:
            card.write(chosen_section(table, chosen, cfg.monitor, folds))
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(chosen_section(table, chosen, cfg.monitor, folds))
        print(f"final_model/ is candidate {chosen!r} (candidates/{chosen}/final_model)")
        if cfg.task.get("push_to_hub"):
            push(cfg.task.push_to_hub, final)
    return metrics


def chosen_section(table: dict, chosen: str, monitor: str, folds: int = 1) -> str:
    rows = [f"| {'**' + n + '**' if n == chosen else n} | {' '.join(t['overrides']) or '(as configured)'} | "
            f"{t['val']:.4f} | {t['final_model']} |" for n, t in table.items()]
    why = (f"Each candidate trained on its own (`candidates/<name>/`); this model is the one whose trained model "
           f"scored best on `{monitor}` (a refit's selection run's, as a refit has no held-out number; the final "
           "model column says where task.keep_start then exported the start).")
    if folds > 1:
        why += (f" The number is the mean over {folds} folds of the training queries (task.folds): each candidate "
                "also trained holding out each other fold in turn (`candidates/<name>/folds/<f>/`); this model is "
                "its fold-0 run's.")
    value = f"{monitor} (mean of {folds} folds)" if folds > 1 else monitor
    return "\n".join(["", "### Chosen by validation (`task.candidates`)", "", why, "",
                      f"| candidate | overrides | {value} | final model |", "|---|---|---:|---|", *rows, ""])

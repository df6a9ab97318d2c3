"""Reporting checklists (CLAIM, TRIPOD+AI) and a model card, answered from what a run folder holds.

Each item says where the report answers it and the value, or that it is not available from the run and
what the user must add (ethics approval, eligibility criteria, the reference standard's readers...).
The items are paraphrased by topic; numbers follow CLAIM (Mongan et al., Radiology: AI 2020; the 2024
update by Tejani et al. extends it to 44 items) and TRIPOD+AI (Collins et al., BMJ 2024). Check the
wording against the published checklists before submitting a paper: this tool fills in what the run
can prove, not the items only the authors know.
"""

from __future__ import annotations

from dataclasses import dataclass

from medlens import __version__
from medlens.run import Run


@dataclass
class Facts:
    run: Run
    metrics: dict
    sections: set[str]

    @property
    def meta(self):
        return self.run.meta

    @property
    def cfg(self):
        return self.run.config


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _m(f: Facts, split: str, key: str) -> str:
    m = f.metrics.get(split, {}).get("metrics", {}).get(key)
    return f"{_fmt(m['value'])} [{_fmt(m['ci_low'])}-{_fmt(m['ci_high'])}]" if m else "n/a"


def _flags(f: Facts) -> str:
    flags = f.metrics.get("shift", {}).get("flags", [])
    return "; ".join(flags) if flags else "no validation-to-test drift above the tolerance"


# (item id, topic, answer(facts) -> (where, value) or None, what the user must add when None)
def _split(f):
    return "Summary", f"{f.meta.split_method}; train/val/test = {f.meta.n_samples}"


def _prep(f):
    p = f.meta.preprocessing
    return "Summary, Configuration", (f"{p.color}, input {f.meta.input_size}, window {p.window or 'none'}, "
                                      f"CLAHE {'on' if p.clahe else 'off'}, normalised with the training mean/std")


def _model(f):
    return "Summary, Configuration", f"{f.meta.model} {f.meta.model_params or ''} ({f.meta.kind})"


def _software(f):
    env = f.meta.environment or {}
    libs = ", ".join(f"{k} {v}" for k, v in env.items() if isinstance(v, str))
    return "run.json (environment)", f"medlens {f.meta.medlens_version}; {libs}"[:300]


def _init(f):
    if f.meta.transfer:
        return "run.json (transfer)", f"transfer from {f.cfg.model.pretrained} ({f.meta.transfer.get('loaded')} tensors)"
    return "Configuration", f"random initialisation, seed {f.cfg.seed}"


def _training(f):
    t = f.cfg.train
    return "Configuration, Training curves", (f"{t.optimizer}, lr {t.lr}, batch {t.batch_size}, {f.meta.epochs_run} "
                                              f"epochs, scheduler {t.scheduler}, augmentation {t.augment.model_dump()}")


def _selection(f):
    return "run.json (best_epoch_metric)", f"checkpoint with the best {f.cfg.train.monitor} on validation"


def _main(f) -> str:
    return "dice" if str(f.meta.task) == "segmentation" else "auc"


def _metrics(f):
    k = _main(f)
    return "Results", f"{k} {_m(f, f.metrics.get('evaluated_split', 'test'), k)} and the table of metrics"


def _ci(f):
    n = f.metrics.get(f.metrics.get("evaluated_split", "test"), {}).get("n_bootstrap", 0)
    return "Results", f"95% percentile bootstrap CIs ({n} resamples) on every metric"


def _robust(f):
    if "shift" not in f.metrics:
        return None
    sub = f"; subgroups: {', '.join(f.metrics['subgroups'])}" if "subgroups" in f.metrics else ""
    return "Shift, Subgroups", _flags(f) + sub


def _explain(f):
    return ("Explanations", "Grad-CAM maps with faithfulness checks") if "explanations" in f.sections else None


def _flow(f):
    return "Summary", f"cases per split {f.meta.n_samples}; per class {f.meta.class_counts}"


def _demo(f):
    if "subgroups" not in f.metrics:
        return None
    return "Subgroups", ", ".join(f"{c}: {len(v['groups'])} groups" for c, v in f.metrics["subgroups"].items())


def _perf(f):
    k = _main(f)
    return "Results", f"validation {k} {_m(f, 'val', k)}; test {k} {_m(f, 'test', k)}"


def _failure(f):
    return "Figures (false positive / false negative galleries)", "the most confident errors on the test split"


def _limits(f):
    return "Clinical honesty, Shift", _flags(f)


def _calib(f):
    c = f.metrics.get("calibration")
    if not c:
        return None
    t = c.get(f.metrics.get("evaluated_split", "test"), {})
    after = t.get("after", {}).get("ece", {}).get("value")
    on = "the site sample" if c.get("fitted_on") == "site" else "validation"
    return "Calibration", (f"ECE {_fmt(t['before']['ece']['value'])} before, {_fmt(after)} after "
                           f"{c['method'] or 'no'} scaling (fitted on {on})")


def _dca(f):
    d = f.metrics.get("decision_curve")
    if not d:
        return None
    rng = (f"{d['useful_from']:.2f}-{d['useful_to']:.2f}" if d["useful_from"] is not None else "no threshold")
    return "Decision curve", f"net benefit above treat-all and treat-none at threshold probabilities {rng}"


def _imbalance(f):
    return "Configuration", f"train.imbalance = {f.cfg.train.imbalance}; class counts {f.meta.class_counts}"


def _threshold(f):
    th = f.meta.threshold
    on = "a site's own labelled sample" if th and th.chosen_on == "site" else "validation"
    return ("Summary", f"{th.value:.4f} by {th.rule}, chosen on {on} before the test split was scored"
            if th else "argmax (no threshold)")


def _code(f):
    return "Configuration", f"config.yaml and seed {f.cfg.seed} in the run folder (medlens {__version__})"


def _missing(f):
    return "data loaders", "rows with blank paths, labels or patient ids are refused, not imputed"


USER = None
CLAIM = [
    ("1", "identification as an AI study, category of technology", _model, ""),
    ("2", "structured abstract", USER, "write the abstract"),
    ("3", "clinical background, intended use and clinical role", USER, "state the intended use and clinical role"),
    ("4", "study objectives and hypotheses", USER, "state the objectives and hypotheses"),
    ("5", "prospective or retrospective design", USER, "state how and when the data were collected"),
    ("6", "study goal (model creation, feasibility, non-inferiority...)", USER, "state the study goal"),
    ("7", "data sources", lambda f: ("Summary", f"{f.meta.dataset}"), ""),
    ("8", "eligibility criteria", USER, "state inclusion and exclusion criteria"),
    ("9", "data pre-processing", _prep, ""),
    ("10", "selection of data subsets", lambda f: ("Configuration", f"max_samples = {f.cfg.data.max_samples}"), ""),
    ("11", "definitions of data elements", lambda f: ("Summary", f"classes {f.meta.class_names}"), ""),
    ("12", "de-identification methods", USER, "state how the images were de-identified (medlens deid applies PS3.15)"),
    ("13", "handling of missing data", _missing, ""),
    ("14", "reference standard definition", USER, "define the reference standard (labels) in detail"),
    ("15", "rationale for the reference standard", USER, "justify the reference standard"),
    ("16", "source and qualifications of annotators", USER, "name who labelled the data and their training"),
    ("17", "annotation tools", USER, "name the annotation tools"),
    ("18", "inter- and intra-rater variability", USER, "measure and report reader variability"),
    ("19", "sample size and how it was determined", USER, "justify the sample size"),
    ("20", "assignment to partitions", _split, ""),
    ("21", "level at which partitions are disjoint", _split, ""),
    ("22", "model description", _model, ""),
    ("23", "software and libraries", _software, ""),
    ("24", "initialisation of parameters", _init, ""),
    ("25", "training details and hyper-parameters", _training, ""),
    ("26", "selection of the final model", _selection, ""),
    ("27", "ensembling", lambda f: ("Configuration", "a single model, no ensemble"), ""),
    ("28", "performance metrics", _metrics, ""),
    ("29", "statistical significance and uncertainty", _ci, ""),
    ("30", "robustness or sensitivity analysis", _robust, "evaluate on shifted data"),
    ("31", "explainability methods", _explain, "run medlens explain"),
    ("32", "validation on external data", USER, "evaluate on data from another site (medlens evaluate on its config)"),
    ("33", "flow of cases", _flow, ""),
    ("34", "characteristics of cases in each partition", _demo,
     "add demographic columns to the manifest and evaluation.subgroups"),
    ("35", "performance on all partitions", _perf, ""),
    ("36", "diagnostic accuracy with precision (CIs)", _ci, ""),
    ("37", "failure analysis", _failure, ""),
    ("38", "limitations", _limits, ""),
    ("39", "implications for practice", USER, "discuss implications for practice"),
    ("40", "registration", USER, "give the registration number"),
    ("41", "protocol, data and code availability", _code, ""),
    ("42", "funding", USER, "name the funding sources"),
    ("2024", "ethics approval and consent", USER, "state the ethics approval and consent (waiver)"),
    ("2024", "operating point / threshold selection", _threshold, ""),
]
TRIPOD_AI = [
    ("data", "data sources and dates", lambda f: ("Summary", f"{f.meta.dataset}"), ""),
    ("participants", "participants and setting", USER, "describe the setting, eligibility and dates"),
    ("data preparation", "data preparation and quality checks", _prep, ""),
    ("outcome", "outcome (target) definition", lambda f: ("Summary", f"classes {f.meta.class_names}"), ""),
    ("sample size", "sample size justification", USER, "justify the sample size"),
    ("missing data", "handling of missing data", _missing, ""),
    ("analysis", "model type, building and tuning", _training, ""),
    ("class imbalance", "class imbalance handling", _imbalance, ""),
    ("fairness", "fairness across groups", _demo, "add subgroup columns (evaluation.subgroups)"),
    ("model output", "model output and threshold", _threshold, ""),
    ("training vs evaluation", "differences between development and evaluation data", _robust, ""),
    ("performance", "discrimination with CIs", _perf, ""),
    ("calibration", "calibration", _calib, "calibration needs a binary or multi-class run"),
    ("clinical utility", "net benefit (decision curve)", _dca, "a decision curve needs a binary run"),
    ("ethics", "ethical approval", USER, "state the ethics approval"),
    ("funding", "funding and conflicts of interest", USER, "state funding and conflicts of interest"),
    ("protocol", "protocol and registration", USER, "give the protocol and registration"),
    ("data sharing", "data availability", USER, "state where the data can be obtained"),
    ("code sharing", "code availability", _code, ""),
    ("patient involvement", "patient and public involvement", USER, "describe patient and public involvement"),
    ("limitations", "limitations", _limits, ""),
    ("usability", "usability in current care", USER, "describe how the model fits the clinical pathway"),
]


def checklist(run: Run, metrics: dict, sections: set[str]) -> list[dict]:
    """Every CLAIM and TRIPOD+AI item: answered from the run (where, value) or what the user must add."""
    f = Facts(run, metrics, sections)
    out = []
    for guideline, items in (("CLAIM", CLAIM), ("TRIPOD+AI", TRIPOD_AI)):
        for item, topic, answer, needed in items:
            got = answer(f) if answer else None
            row = {"guideline": guideline, "item": item, "topic": topic}
            if got:
                row |= {"status": "answered", "where": got[0], "value": str(got[1])}
            else:
                row |= {"status": "not available from the run", "where": "", "value": "", "needed": needed}
            out.append(row)
    return out


def model_card(run: Run, metrics: dict) -> dict:
    """Intended use, data, metrics, calibration, subgroups and limitations, as data for the report and
    ``model_card.md``."""
    meta, cfg = run.meta, run.config
    split = metrics.get("evaluated_split", "test")
    f = Facts(run, metrics, set())
    card = {
        "model": f"{meta.model} ({meta.kind}, {meta.spatial_dims}D, {meta.in_channels} channel(s), "
                 f"input {meta.input_size})",
        "intended_use": "Research use: " + (f"{meta.task} of {', '.join(meta.class_names)}"
                                            f" on {meta.dataset}-like images.")
        + " Not a medical device; not for clinical decisions without a prospective validation at the site.",
        "data": f"{meta.dataset}; {meta.split_method}; train/val/test {meta.n_samples}; classes {meta.class_counts}",
        "metrics": {k: _m(f, split, k) for k in ("auc", "sensitivity", "specificity", "accuracy", "balanced_accuracy")
                    if k in metrics.get(split, {}).get("metrics", {})},
        "threshold": _threshold(f)[1],
        "calibration": (_calib(f) or ("", "none"))[1],
        "subgroups": (_demo(f) or ("", "no subgroup columns were given"))[1],
        "limitations": [
            "Validated on a held-out split of the development source only; another site, scanner or population "
            "may perform differently.",
            _flags(f).capitalize() + ".",
            f"Trained with seed {cfg.seed}; performance varies between seeds and is not averaged here.",
        ],
    }
    return card


def model_card_markdown(card: dict, name: str) -> str:
    lines = [f"# Model card: {name}", "", f"- **Model:** {card['model']}", f"- **Intended use:** {card['intended_use']}",
             f"- **Data:** {card['data']}", f"- **Decision threshold:** {card['threshold']}",
             f"- **Calibration:** {card['calibration']}", f"- **Subgroups:** {card['subgroups']}", "",
             "## Metrics (test, 95% CI)", ""]
    lines += [f"- {k}: {v}" for k, v in card["metrics"].items()]
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in card["limitations"]]
    return "\n".join(lines) + "\n"

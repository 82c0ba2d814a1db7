"""What a run fine-tuned, for method names: the purifier (DM-FT), the classifier (CLS-FT) or both. No torch.

The paper's last table compares fine-tuning the diffusion model (DM-FT, ``cpcluster finetune``), the classifier
behind the purifier (CLS-FT, ``cpcluster finetune-classifier``) and both. A run config says which: a fine-tuned
denoiser's description carries a ``finetuned`` record (``finetuned:DIR`` denoisers), and so does a fine-tuned
classifier's (``finetuned:DIR`` classifiers). :func:`finetuning_label` turns them into the bracketed suffix of the
method name.
"""
from __future__ import annotations


def finetuning_label(config: dict) -> str:
    """What was fine-tuned, as in the paper's last table: ``"DM-FT"`` (the purifier's network is a ``finetune``
    result), ``"CLS-FT: <classifier spec>"`` (the classifier is a ``finetune-classifier`` result), ``"DM-FT +
    CLS-FT: <classifier spec>"`` (both), or ``""``. Read from the ``finetuned`` records of the run config."""
    den, clf = config.get("denoiser"), config.get("classifier")
    dm = isinstance(den, dict) and isinstance(den.get("finetuned"), dict)
    cls = isinstance(clf, dict) and isinstance(clf.get("finetuned"), dict)
    parts = (["DM-FT"] if dm else []) + ([f"CLS-FT: {clf.get('spec')}"] if cls else [])
    return " + ".join(parts)

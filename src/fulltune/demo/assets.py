"""The demo's tiny base model, tokenizer and datasets, built deterministically, offline, on first use.

The demo fine-tunes a general-English model on clinical notes and shows two things: the model
learns the domain (eval perplexity drops, clinical abbreviations become predictable) and forgets
some general knowledge (perplexity on held-out general text rises, unless replay mixing is used).
Everything is generated here, so the demo and the tests never touch the network.

How each asset is made:

- **General English text.** The docstrings of a fixed, sorted list of standard-library modules
  (`STDLIB_MODULES`): each module, its classes and functions, and the methods of those classes.
  Only public names that the standard library itself defines count, so the text does not depend on
  what else the process imported (transformers patches `logging.Logger`, typing_extensions patches
  `typing`). Docstrings are deduplicated and sorted, split into paragraphs, whitespace-collapsed,
  and kept if they look like prose (`_is_prose`). A seeded shuffle holds out `GENERAL_RECORDS`
  paragraphs as the *general* evaluation set; the rest is the *pre-training* text. The text depends
  only on the Python version (and, for a few modules such as `os`, the platform), so the Python
  version is part of the cache key.
- **Tokenizer.** A byte-level BPE (`tokenizers`), vocabulary `VOCAB_SIZE`, trained on the
  pre-training text only. It has never seen a clinical note, so terms such as "HbA1c", "eGFR" and
  "NSTEMI" split into several pieces. Special tokens: `<|endoftext|>` (bos and eos), `<|pad|>`
  (padding, distinct from eos) and the chat markers `<|system|>`, `<|user|>`, `<|assistant|>`,
  `<|end|>`, used by a Jinja chat template. No special token is added on encode (GPT-2 style):
  the preprocessing step appends eos between packed documents.
- **Clinical notes.** `clinical_note` fills one of several note templates (admission, clinic
  follow-up, discharge summary, cardiology consult, nephrology note) from a `random.Random` with a
  fixed seed. The values are internally consistent so a model can learn them: the CKD stage follows
  from the eGFR, metformin is held below an eGFR of 30 and dose-reduced below 45, a raised troponin
  with no ST elevation is called an NSTEMI, LVEF below 40% is HFrEF, HbA1c is graded against the 7%
  target. `TRAIN_NOTES` training and `EVAL_NOTES` eval notes come from separate seeds, and no eval
  note repeats a training note.
- **Base model.** A tiny Llama-shaped `LlamaForCausalLM` (`model_config`), initialised under a fixed
  `torch.manual_seed` and pre-trained for `PRETRAIN_STEPS` AdamW steps on packed 128-token
  sequences of the pre-training text, so that it has general knowledge to forget. Saved in float32
  as safetensors with its tokenizer and a greedy generation config.

Cache layout: `root/<CACHE_KEY>/` holds `base_model/`, `data/{train,eval,general}.jsonl`,
`build_info.json` (sizes, losses, timings) and the completion marker `COMPLETE`. A build happens in a
temporary sibling directory that is renamed into place, so a reader sees a whole cache or none and
concurrent builders cannot corrupt it (the first rename wins, the others discard their copy).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import random
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerFast


#: Bump whenever anything below changes what is generated; it is part of the cache key.
ASSETS_VERSION = "v1"
CACHE_KEY = f"{ASSETS_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
COMPLETE_MARKER = "COMPLETE"

SEED = 20240611
VOCAB_SIZE = 4096
GENERAL_RECORDS = 300
TRAIN_NOTES = 1500
EVAL_NOTES = 150
SEQ_LEN = 128
PRETRAIN_STEPS = 250
PRETRAIN_BATCH = 16
#: Sequences per forward pass. Eight keep the logits (8 x 128 x 4096 floats) at 16 MiB, under glibc's
#: mmap threshold, so their memory is reused rather than mapped and page-faulted anew every step.
PRETRAIN_MICRO_BATCH = 8
PRETRAIN_LR = 3e-3

BOS_TOKEN = EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, *CHAT_MARKERS)

#: `<|role|>\ncontent<|end|>\n` per message; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

#: Clinical terms the general tokenizer splits into several pieces; the demo reports on them.
DOMAIN_TERMS = [
    "HbA1c", "eGFR", "NSTEMI", "troponin", "BNP", "LVEF", "HFrEF", "metformin", "empagliflozin", "fondaparinux",
]  # fmt: skip

#: Standard-library modules present on every CPython build; imported in this (sorted) order.
STDLIB_MODULES = sorted(
    [
        "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
        "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
        "email", "email.message", "email.utils", "enum", "fractions", "functools", "getopt", "gettext",
        "glob", "hashlib", "heapq", "hmac", "html", "html.parser", "http", "http.client", "http.cookies",
        "http.server", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
        "logging.handlers", "mailbox", "math", "mimetypes", "numbers", "operator", "optparse", "os",
        "pathlib", "pickle", "pprint", "pydoc", "queue", "random", "re", "sched", "secrets", "shlex",
        "shutil", "smtplib", "socketserver", "statistics", "string", "struct", "subprocess", "tarfile",
        "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "types", "typing",
        "unittest", "unittest.mock", "urllib", "urllib.parse", "urllib.request", "uuid", "warnings",
        "weakref", "zipfile",
    ]
)  # fmt: skip


@dataclass(frozen=True)
class DemoAssets:
    """Paths to the built demo assets (all local)."""

    root: Path
    base_model_dir: Path  # Hugging Face model dir: config.json, model.safetensors, tokenizer files
    train_uri: str  # domain training data, JSONL of {"text": ...} records
    eval_uri: str  # domain eval data, JSONL {"text": ...}
    general_uri: str  # general-domain English text, JSONL {"text": ...}, held out from pre-training
    domain_terms: list[str]


@dataclass(frozen=True)
class Corpora:
    """The generated texts: what the tokenizer and model pre-train on, and the three datasets."""

    pretrain: list[str]
    general: list[str]
    train: list[str]
    eval: list[str]


def _progress(message: str, *args: object) -> None:
    """A short progress line on stderr (the build takes about a minute; people should see it move)."""
    print(message % args if args else message, file=sys.stderr, flush=True)


# -- general English: standard-library docstrings ----------------------------------------------------


def _from_stdlib(obj: Any) -> bool:
    """Whether `obj` was defined by the standard library, not patched in by a third-party import.

    transformers, for one, adds `warning_once` and friends to `logging.Logger`; without this check
    the corpus would depend on what the process imported before.
    """
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    elif isinstance(obj, property):
        obj = obj.fget
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str):  # C-level descriptors (str.join, ...) carry no module
        return True
    return module.partition(".")[0] in sys.stdlib_module_names


def _documented(name: str, obj: Any) -> bool:
    """A public class, function or method that the standard library itself defines."""
    api = (
        inspect.isclass(obj)
        or inspect.isroutine(obj)
        or isinstance(obj, (property, classmethod, staticmethod))
    )
    return api and not name.startswith("_") and _from_stdlib(obj)


def _docstring_objects(module: Any) -> Iterator[Any]:
    """The module, its public classes and functions, and their public methods.

    Never submodules, plain values or private names (private helpers are what other packages patch,
    as typing_extensions does `typing._collect_parameters`).
    """
    yield module
    for name, obj in sorted(vars(module).items()):
        if _documented(name, obj):
            yield obj
            if inspect.isclass(obj):
                yield from (m for attr, m in sorted(vars(obj).items()) if _documented(attr, m))


def _is_prose(paragraph: str) -> bool:
    """A paragraph of sentences, not a code sample, signature or table."""
    if len(paragraph) < 80 or ">>>" in paragraph or "::" in paragraph:
        return False
    words = paragraph.split()
    wordy = sum(1 for w in words if re.fullmatch(r"[A-Za-z][a-z'-]*[.,;:]?", w))
    return len(words) >= 12 and wordy / len(words) >= 0.6


def stdlib_paragraphs() -> list[str]:
    """Deduplicated, sorted prose paragraphs from the docstrings of `STDLIB_MODULES`."""
    docs: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. typing.io's DeprecationWarning on attribute access
        for name in STDLIB_MODULES:
            for obj in _docstring_objects(importlib.import_module(name)):
                doc = getattr(obj, "__doc__", None)
                if isinstance(doc, str):
                    docs.add(inspect.cleandoc(doc))
    paragraphs = {
        " ".join(block.split()) for doc in docs for block in re.split(r"\n\s*\n", doc) if block.strip()
    }
    return sorted(p for p in paragraphs if _is_prose(p))


# -- clinical notes ------------------------------------------------------------------------------------

_FIRST_CONTACT = ["presented to the ED with", "was admitted with", "was referred for", "attended clinic with"]
_SYMPTOMS = [
    "central chest pain radiating to the left arm",
    "substernal chest pressure at rest",
    "exertional dyspnea and orthopnea",
    "palpitations and presyncope",
    "bilateral leg swelling and fatigue",
    "polyuria, polydipsia and weight loss",
    "epigastric discomfort and diaphoresis",
]
_HISTORY = [
    "T2DM",
    "HTN",
    "hyperlipidemia",
    "CKD",
    "AF on apixaban",
    "prior PCI to the LAD",
    "COPD",
    "obesity",
]
_SEX = [("M", "He"), ("F", "She")]


def _ckd_stage(egfr: int) -> str:
    for floor, stage in ((90, "1"), (60, "2"), (45, "3a"), (30, "3b"), (15, "4")):
        if egfr >= floor:
            return stage
    return "5"


def _metformin_plan(egfr: int, rng: random.Random) -> str:
    if egfr < 30:
        return f"Hold metformin as eGFR is {egfr} (below 30)."
    if egfr < 45:
        return f"Reduce metformin to 500 mg BID given eGFR {egfr}."
    return f"Continue metformin {rng.choice(['500 mg BID', '1000 mg BID', '850 mg BID'])}."


def _glycemic_control(hba1c: float) -> str:
    if hba1c < 7.0:
        return f"HbA1c {hba1c:.1f}% is at target (below 7%)."
    if hba1c < 9.0:
        return f"HbA1c {hba1c:.1f}% is above the 7% target."
    return f"HbA1c {hba1c:.1f}% indicates poor glycemic control."


def _heart_failure(lvef: int) -> str:
    if lvef < 40:
        return f"TTE shows LVEF {lvef}%, consistent with HFrEF."
    if lvef < 50:
        return f"TTE shows LVEF {lvef}%, consistent with HFmrEF."
    return f"TTE shows preserved LVEF {lvef}%."


@dataclass(frozen=True)
class _Patient:
    """One synthetic patient: the values a note quotes and the sentences every kind of note reuses."""

    age: int
    sex: str
    pronoun: str
    egfr: int
    stage: str
    hba1c: float
    bnp: int
    lvef: int
    creat: float
    intro: str
    labs: str
    cardiac: str
    acs: str
    acs_plan: str
    hf_plan: str
    sglt2: str
    k_note: str


def _patient(rng: random.Random) -> _Patient:
    # The draws happen in a fixed order: the demo's data (and its cached assets) depend on it.
    age = rng.randint(38, 89)
    sex, pronoun = rng.choice(_SEX)
    egfr = rng.randint(12, 105)
    stage = _ckd_stage(egfr)
    hba1c = round(rng.uniform(5.6, 11.8), 1)
    troponin = round(rng.choice([rng.uniform(0.01, 0.04), rng.uniform(0.08, 4.5)]), 2)
    bnp = rng.randint(40, 2400)
    lvef = rng.choice([rng.randint(20, 39), rng.randint(40, 49), rng.randint(50, 68)])
    creat = round(75 / egfr * rng.uniform(0.85, 1.15), 2)
    potassium = round(rng.uniform(3.4, 5.8), 1)
    ldl = round(rng.uniform(1.4, 4.9), 1)
    history = ", ".join(sorted(rng.sample(_HISTORY, rng.randint(2, 4))))
    intro = f"{age}{sex} with {history} {rng.choice(_FIRST_CONTACT)} {rng.choice(_SYMPTOMS)}."
    labs = (
        f"Labs: HbA1c {hba1c:.1f}%, eGFR {egfr} mL/min/1.73m2 (CKD stage {stage}), "
        f"Cr {creat:.2f} mg/dL, K+ {potassium:.1f} mmol/L, LDL {ldl:.1f} mmol/L."
    )
    acs, acs_plan = _coronary(troponin, egfr, rng)
    return _Patient(
        age,
        sex,
        pronoun,
        egfr,
        stage,
        hba1c,
        bnp,
        lvef,
        creat,
        intro,
        labs,
        cardiac=f"Troponin I {troponin:.2f} ng/mL, BNP {bnp} pg/mL.",
        acs=acs,
        acs_plan=acs_plan,
        hf_plan=(
            f"Start furosemide {rng.choice([20, 40, 80])} mg IV BID for fluid overload (BNP {bnp})."
            if bnp > 400
            else f"BNP {bnp} pg/mL does not suggest decompensated HF."
        ),
        sglt2=(
            f"Start empagliflozin 10 mg daily for T2DM with CKD stage {stage}."
            if egfr >= 20
            else "SGLT2 inhibitor not started as eGFR is below 20."
        ),
        k_note=(
            f"K+ {potassium:.1f}, hold ACEi and repeat U&E in 24 h."
            if potassium > 5.3
            else f"K+ {potassium:.1f} acceptable on ramipril {rng.choice([2.5, 5, 10])} mg daily."
        ),
    )


def _coronary(troponin: float, egfr: int, rng: random.Random) -> tuple[str, str]:
    """(impression, plan): NSTEMI when troponin is raised, else ruled out."""
    if troponin < 0.04:
        return (
            "ECG in sinus rhythm without acute ST changes; serial troponin negative, NSTEMI ruled out.",
            "No ACS; continue aspirin 81 mg daily and atorvastatin 40 mg nightly.",
        )
    ecg = rng.choice(["ECG shows ST depression in V4-V6", "ECG shows T-wave inversion in the lateral leads"])
    anticoagulant = "fondaparinux 2.5 mg SC daily" if egfr >= 20 else "UFH infusion given eGFR below 20"
    return (
        f"{ecg}, no ST elevation. Impression: NSTEMI.",
        f"Load aspirin 300 mg and clopidogrel 300 mg, start atorvastatin 80 mg nightly, {anticoagulant}, "
        "refer for coronary angiography.",
    )


def _admission(p: _Patient, rng: random.Random) -> list[str]:
    return [p.intro, p.cardiac, p.acs, p.labs, _heart_failure(p.lvef), "Plan: " + p.acs_plan, p.hf_plan]


def _diabetes_clinic(p: _Patient, rng: random.Random) -> list[str]:
    return [
        f"Clinic review: {p.age}{p.sex}, T2DM and CKD stage {p.stage}.",
        p.labs,
        _glycemic_control(p.hba1c),
        _metformin_plan(p.egfr, rng),
        p.sglt2,
        p.k_note,
    ]


def _discharge(p: _Patient, rng: random.Random) -> list[str]:
    return [
        f"Discharge summary. {p.intro}",
        p.acs,
        _heart_failure(p.lvef),
        f"Discharge labs: eGFR {p.egfr}, HbA1c {p.hba1c:.1f}%, BNP {p.bnp} pg/mL.",
        "Discharge meds: " + p.acs_plan,
        _metformin_plan(p.egfr, rng),
    ]


def _cardiology_consult(p: _Patient, rng: random.Random) -> list[str]:
    return [
        f"Cardiology consult for {rng.choice(['raised troponin', 'chest pain', 'dyspnea'])}.",
        p.intro,
        p.cardiac,
        p.acs,
        _heart_failure(p.lvef),
        p.hf_plan,
        "Recommend " + p.acs_plan[0].lower() + p.acs_plan[1:],
    ]


def _nephrology(p: _Patient, rng: random.Random) -> list[str]:
    return [
        f"Nephrology: {p.age}{p.sex} with CKD stage {p.stage}, eGFR {p.egfr} mL/min/1.73m2, Cr {p.creat:.2f} mg/dL.",
        p.k_note,
        _metformin_plan(p.egfr, rng),
        p.sglt2,
        _glycemic_control(p.hba1c),
        f"{p.pronoun} will be reviewed in {rng.choice([4, 6, 8, 12])} weeks with repeat eGFR and HbA1c.",
    ]


_NOTE_KINDS = (_admission, _diabetes_clinic, _discharge, _cardiology_consult, _nephrology)


def clinical_note(rng: random.Random) -> str:
    """One synthetic clinical note: a few sentences dense with abbreviations and lab values."""
    patient = _patient(rng)
    return " ".join(_NOTE_KINDS[rng.randrange(len(_NOTE_KINDS))](patient, rng))


def clinical_notes(count: int, seed: int, *, exclude: frozenset[str] = frozenset()) -> list[str]:
    """`count` distinct notes from `random.Random(seed)`, none of them in `exclude`."""
    rng = random.Random(seed)
    notes: list[str] = []
    seen = set(exclude)
    while len(notes) < count:
        note = clinical_note(rng)
        if note not in seen:
            seen.add(note)
            notes.append(note)
    return notes


def make_corpora() -> Corpora:
    """All generated text, deterministically (see the module docstring)."""
    paragraphs = stdlib_paragraphs()
    shuffled = list(paragraphs)
    random.Random(SEED).shuffle(shuffled)
    general = sorted(shuffled[:GENERAL_RECORDS])
    pretrain = sorted(shuffled[GENERAL_RECORDS:])
    train = clinical_notes(TRAIN_NOTES, SEED + 1)
    eval_ = clinical_notes(EVAL_NOTES, SEED + 2, exclude=frozenset(train))
    return Corpora(pretrain=pretrain, general=general, train=train, eval=eval_)


def write_jsonl(path: Path, texts: list[str]) -> None:
    """One `{"text": ...}` record per line, UTF-8, `\\n` line endings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


# -- tokenizer -------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `VOCAB_SIZE` tokens trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tokenizer_and_data(out_dir: Path) -> tuple[PreTrainedTokenizerFast, Corpora]:
    """Write `data/{train,eval,general}.jsonl` and the tokenizer into `out_dir/base_model`.

    Everything except the pre-trained weights; deterministic, so two calls write the same bytes.
    """
    corpora = make_corpora()
    data_dir = out_dir / "data"
    write_jsonl(data_dir / "train.jsonl", corpora.train)
    write_jsonl(data_dir / "eval.jsonl", corpora.eval)
    write_jsonl(data_dir / "general.jsonl", corpora.general)
    tokenizer = train_tokenizer(corpora.pretrain)
    tokenizer.save_pretrained(out_dir / "base_model")
    return tokenizer, corpora


# -- base model --------------------------------------------------------------------------------------------


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The tiny Llama shape of the demo base model (about 0.36M parameters)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def pack(tokenizer: PreTrainedTokenizerFast, texts: list[str], seq_len: int = SEQ_LEN) -> Any:
    """Texts tokenized, each followed by eos, concatenated and cut into `[n, seq_len]` (rest dropped)."""
    import torch

    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def mean_loss(model: Any, sequences: Any, batch_size: int = 32) -> float:
    """Mean next-token loss of `model` over packed `sequences` (token-weighted over equal lengths)."""
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            losses.append(model(input_ids=batch, labels=batch).loss.item() * len(batch))
    return sum(losses) / len(sequences)


#: Pre-training runs on one intra-op thread: the weights are then bit-identical on every machine
#: (float reductions split over a different number of threads round differently), and on a busy
#: 2-core machine a second OpenMP thread competing for a loaded core costs 10x, not a gain.
PRETRAIN_THREADS = 1


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrain_base_model(
    tokenizer: PreTrainedTokenizerFast, corpora: Corpora, out_dir: Path, *, steps: int = PRETRAIN_STEPS
) -> dict[str, Any]:
    """Initialise the tiny Llama under a fixed seed, pre-train it on `corpora.pretrain`, save it.

    Returns the general-set loss before and after pre-training and the number of tokens seen.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(model_config(tokenizer)).float()
    train = pack(tokenizer, corpora.pretrain)
    general = pack(tokenizer, corpora.general)
    loss_before = mean_loss(model, general)

    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(train), generator=generator)
    model.train()
    cursor = 0
    for step in range(steps):
        if cursor + PRETRAIN_BATCH > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        batch = train[order[cursor : cursor + PRETRAIN_BATCH]]
        cursor += PRETRAIN_BATCH
        loss = 0.0
        for micro in batch.split(PRETRAIN_MICRO_BATCH):
            micro_loss = model(input_ids=micro, labels=micro).loss * (len(micro) / len(batch))
            micro_loss.backward()
            loss += micro_loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            _progress("pre-training step %d/%d: loss %.3f", step + 1, steps, loss)

    loss_after = mean_loss(model, general)
    model.generation_config = GenerationConfig(  # greedy; stops at the end of a document or a chat turn
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(out_dir)
    return {
        "general_loss_before": round(loss_before, 4),
        "general_loss_after": round(loss_after, 4),
        "pretrain_steps": steps,
        "pretrain_tokens": steps * PRETRAIN_BATCH * SEQ_LEN,
        "pretrain_sequences": len(train),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# -- the cache ---------------------------------------------------------------------------------------------


def _assets(root: Path) -> DemoAssets:
    data = root / "data"
    return DemoAssets(
        root=root,
        base_model_dir=root / "base_model",
        train_uri=str(data / "train.jsonl"),
        eval_uri=str(data / "eval.jsonl"),
        general_uri=str(data / "general.jsonl"),
        domain_terms=list(DOMAIN_TERMS),
    )


def _build(out_dir: Path) -> dict[str, Any]:
    """Build every asset into `out_dir` (a fresh directory); returns the build info."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    tokenizer, corpora = build_tokenizer_and_data(out_dir)
    timings["tokenizer_and_data_s"] = round(time.perf_counter() - start, 2)
    _progress(
        "demo assets: tokenizer (%d tokens) and data (%d train, %d eval, %d general notes/paragraphs) "
        "in %.1fs",
        len(tokenizer),
        len(corpora.train),
        len(corpora.eval),
        len(corpora.general),
        timings["tokenizer_and_data_s"],
    )
    start = time.perf_counter()
    threads = PRETRAIN_THREADS
    with _torch_threads(threads):
        stats = pretrain_base_model(tokenizer, corpora, out_dir / "base_model")
    timings["pretrain_s"] = round(time.perf_counter() - start, 2)
    _progress(
        "demo assets: base model pre-trained in %.1fs (torch threads: %d), general loss %.2f -> %.2f",
        timings["pretrain_s"],
        threads,
        stats["general_loss_before"],
        stats["general_loss_after"],
    )
    return {
        "version": ASSETS_VERSION,
        "python": sys.version.split()[0],
        "vocab_size": len(tokenizer),
        "records": {
            "train": len(corpora.train),
            "eval": len(corpora.eval),
            "general": len(corpora.general),
            "pretrain": len(corpora.pretrain),
        },
        "domain_terms": DOMAIN_TERMS,
        **stats,
        "timings": timings,
        "threads": threads,
    }


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def build_demo_assets(root: Path, *, force: bool = False) -> DemoAssets:
    """The demo's tokenizer, base model and datasets under `root`, built on first use.

    Args:
        root: Cache directory; the assets live in `root/<CACHE_KEY>/`.
        force: Rebuild even if a complete cache exists; the new copy is renamed into its place.

    Returns:
        Paths to the assets. A complete cache is returned without rebuilding anything.
    """
    root = Path(root)
    final = root / CACHE_KEY
    if _is_complete(final) and not force:
        return _assets(final)

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{CACHE_KEY}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        start = time.perf_counter()
        _progress("demo assets: building %s into %s", CACHE_KEY, final)
        info = _build(tmp)
        info["timings"]["total_s"] = round(time.perf_counter() - start, 2)
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (tmp / COMPLETE_MARKER).write_text(f"{CACHE_KEY}\n")
        _publish(tmp, final, replace=force)
        _progress("demo assets: ready in %s (%.1fs)", final, info["timings"]["total_s"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful publish
    return _assets(final)


def _publish(tmp: Path, final: Path, *, replace: bool) -> None:
    """Rename `tmp` to `final`. Keeps a complete `final` someone else published, unless `replace`."""
    if final.exists() and (replace or not _is_complete(final)):
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        with contextlib.suppress(FileNotFoundError):
            final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:
        if not _is_complete(final):  # the target exists but is not a finished cache: not ours to fix
            raise
        _progress("demo assets: %s was published concurrently; using that copy", final)


def main(argv: list[str] | None = None) -> None:
    """`python -m fulltune.demo.assets ROOT [--force]`: build the assets and print their paths."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    assets = build_demo_assets(args.root, force=args.force)
    print(json.dumps({k: str(v) for k, v in vars(assets).items()}, indent=2))


if __name__ == "__main__":
    main()

"""Training data from every form users keep it in (parquet, json, csv, save_to_disk, streamed) against the packing
rule written out, the seeded shuffle buffer, a resumed distillation's order, and one-line errors."""

import copy

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from transformers import TrainingArguments

from conftest import compressed_testbed
from moe_compress.data import DataConfig, build_datasets, calibration_sequences
from moe_compress.distill import DistillationConfig, distill
from moe_compress.testbed import load_testbed

DOCUMENTS = [f"document {i}: " + "to be or not " * (i % 5) for i in range(40)]  # lengths vary: blocks span them
EQUAL = [f"doc {i:03d}" for i in range(60)]  # 7 bytes + eos: with seq_len 8 a block is one document


@pytest.fixture(scope="module")
def tokenizer():
    return load_testbed()[1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """datasets' Arrow copies of data read whole go to the test's folder, not the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")


def reference_blocks(documents, tokenizer, seq_len):
    """The packing rule written out: each document's ids, then eos, all joined, cut into whole blocks of seq_len."""
    ids = []
    for document in documents:
        ids += tokenizer(document)["input_ids"] + [tokenizer.eos_token_id]
    return [ids[start:start + seq_len] for start in range(0, len(ids) - seq_len + 1, seq_len)]


def table(documents, **columns):
    return datasets.Dataset.from_dict({"text": documents, "id": list(range(len(documents))), **columns})


def parquet_folder(folder, documents, shards=2):
    """A folder as huggingface-cli download leaves one: parquet shards (and here a log file that is no data)."""
    folder.mkdir(parents=True)
    size = -(-len(documents) // shards)
    for shard in range(shards):
        table(documents[shard * size:(shard + 1) * size]).to_parquet(str(folder / f"shard-{shard}.parquet"))
    (folder / "hydra.log").write_text("not data\n")
    return str(folder)


def jsonl_folder(folder, documents):
    folder.mkdir(parents=True)
    table(documents[:20]).to_json(str(folder / "a.jsonl"))
    table(documents[20:]).to_json(str(folder / "b.jsonl"))
    return str(folder)


def glob_folder(folder, documents):
    """The documents under keep/, other parquet files beside them that data_files leaves out."""
    parquet_folder(folder / "keep", documents)
    table(["never read"] * 5).to_parquet(str(folder / "other.parquet"))
    return str(folder)


def saved_folder(folder, documents):
    table(documents).save_to_disk(str(folder))
    return str(folder)


def saved_splits(folder, documents):
    datasets.DatasetDict({"train": table(documents), "validation": table(["held elsewhere"])}).save_to_disk(str(folder))
    return str(folder)


def csv_file(folder, documents):
    folder.mkdir(parents=True)
    table(documents).to_csv(str(folder / "corpus.csv"), index=False)
    return str(folder / "corpus.csv")


FORMS = {  # name: (writer, extra DataConfig fields, the line naming the form, up to its source)
    "parquet folder": (parquet_folder, {}, "data: parquet files (2) from"),
    "jsonl folder": (jsonl_folder, {}, "data: json files (2) from"),
    "data_files globs": (glob_folder, {"data_files": ["keep/*.parquet"]}, "data: parquet files (2) from"),
    "save_to_disk folder": (saved_folder, {}, "data: save_to_disk folder"),
    "save_to_disk splits": (saved_splits, {"split": "train"}, "data: save_to_disk folder"),
    "csv file": (csv_file, {}, "data: csv files (1) from"),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("streaming", [False, True])
def test_every_form_packs_like_the_written_out_rule(form, streaming, tmp_path, tokenizer, capsys):
    write, fields, line = FORMS[form]
    source = write(tmp_path / "data", DOCUMENTS)
    config = DataConfig(source=source, seq_len=16, streaming=streaming, eval_fraction=0.1, eval_documents=6,
                        shuffle_buffer=0, **fields)
    train, held_out = build_datasets(config, tokenizer)
    # read whole: the last tenth (4 of 40 documents) held out; streamed: the first eval_documents
    train_documents, held_documents = (DOCUMENTS[6:], DOCUMENTS[:6]) if streaming else (DOCUMENTS[:36], DOCUMENTS[36:])
    assert [item["input_ids"].tolist() for item in train] == reference_blocks(train_documents, tokenizer, 16)
    assert held_out.blocks.tolist() == reference_blocks(held_documents, tokenizer, 16)
    assert all(torch.equal(item["input_ids"], item["labels"]) for item in train)
    said = [text for text in capsys.readouterr().out.splitlines() if text.startswith("data:")]
    assert said == [f"{line} {source}, {'streamed' if streaming else 'read whole'}"]  # the form, said once


def documents_of(blocks):
    """The documents of blocks that each hold one EQUAL document and its eos."""
    return [bytes(block["input_ids"][:-1].tolist()).decode() for block in blocks]


def test_streamed_documents_pass_through_a_seeded_shuffle_buffer(tmp_path, tokenizer, capsys):
    source = parquet_folder(tmp_path / "data", EQUAL, shards=3)
    order = lambda seed: documents_of(build_datasets(
        DataConfig(source=source, seq_len=8, eval_documents=10, shuffle_buffer=8, seed=seed), tokenizer)[0])
    first = order(1)
    assert sorted(first) == EQUAL[10:] and first != EQUAL[10:]  # every training document once, reordered
    assert order(1) == first and order(2) != first
    held_out = build_datasets(DataConfig(source=source, seq_len=8, eval_documents=10, seed=1), tokenizer)[1]
    assert documents_of(held_out) == EQUAL[:10]  # the first documents, whatever the seed
    assert "data: parquet files (3) from" in capsys.readouterr().out


@pytest.mark.slow
def test_a_resumed_distillation_sees_the_batches_an_uninterrupted_one_sees(tmp_path, tokenizer):
    teacher = load_testbed()[0]
    compressed = compressed_testbed()[0]
    data = DataConfig(source=parquet_folder(tmp_path / "data", EQUAL, shards=3), seq_len=8, eval_documents=4,
                      shuffle_buffer=16, seed=3)

    def run(output_dir, steps):
        """Distill for `steps` (resuming from output_dir's last checkpoint); the batches the student trained on."""
        student, seen = copy.deepcopy(compressed), []
        student.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"].clone()),
                                          with_kwargs=True)
        args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2,
                                 save_steps=2, report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
        assert distill(student, teacher, tokenizer, data, DistillationConfig(), args).state.global_step == steps
        return seen

    uninterrupted = run(tmp_path / "whole", 4)
    stopped, resumed = run(tmp_path / "parts", 2), run(tmp_path / "parts", 4)
    assert len(uninterrupted) == 4 and all(batch.shape == (2, 8) for batch in uninterrupted)
    assert all(torch.equal(a, b) for a, b in zip(stopped + resumed, uninterrupted, strict=True))
    trained = [document for batch in uninterrupted for document in documents_of({"input_ids": row} for row in batch)]
    assert trained != EQUAL[4:12] and set(trained) <= set(EQUAL[4:])  # shuffled, never a held-out document


@pytest.mark.parametrize("write,streaming", [(parquet_folder, True), (parquet_folder, False), (jsonl_folder, True)])
def test_a_missing_text_column_fails_in_one_line_naming_the_columns(write, streaming, tmp_path, tokenizer):
    source = write(tmp_path / "data", DOCUMENTS)
    with pytest.raises(ValueError) as error:
        build_datasets(DataConfig(source=source, text_column="body", streaming=streaming), tokenizer)
    assert str(error.value) == (f"{source} has no column 'body'; its columns are ['text', 'id']: set "
                                "data.text_column to the one holding the text")


def test_bad_sources_and_settings_fail_in_one_line(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    folder = parquet_folder(tmp_path / "data", DOCUMENTS)
    cases = {
        "data.source='parquet' is a datasets builder, which reads every file of the current directory":
            DataConfig(source="parquet"),
        f"{tmp_path / 'empty'} holds no .txt, parquet, json, jsonl, csv or arrow files; point data.source":
            DataConfig(source=str(tmp_path / "empty")),
        "holds no .txt, parquet, json, jsonl, csv or arrow files matching data_files ['nothing/*']":
            DataConfig(source=folder, data_files="nothing/*"),
        "data_files picks files inside a folder and data.source":
            DataConfig(source=f"{folder}/shard-0.parquet", data_files=["*"]),
        "holds the splits ['train', 'validation'], not 'test'; set data.split to one of them":
            DataConfig(source=saved_splits(tmp_path / "saved", DOCUMENTS), split="test"),
        f"cannot open '{folder}' (split 'test'): Bad split: test. Available splits: ['train']":
            DataConfig(source=folder, split="test"),
    }
    for message, config in cases.items():
        with pytest.raises(ValueError) as error:
            build_datasets(config, tokenizer)
        assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"^data_files is empty; give globs"):
        DataConfig(data_files=[])
    with pytest.raises(ValueError, match=r"^shuffle_buffer=-1 must be >= 0"):
        DataConfig(shuffle_buffer=-1)


def test_hydra_builds_the_config_with_the_new_fields():
    node = OmegaConf.merge(OmegaConf.structured(DataConfig),
                           {"data_files": ["sample/10BT/*.parquet"], "shuffle_buffer": 5, "seed": 2})
    config = DataConfig(**OmegaConf.to_container(node))
    assert (config.data_files, config.shuffle_buffer, config.seed) == (["sample/10BT/*.parquet"], 5, 2)
    assert DataConfig(data_files="*.parquet").data_files == ["*.parquet"]  # one glob, as datasets takes it


def test_calibration_spreads_over_data_read_whole_and_takes_the_first_blocks_streamed(tmp_path, tokenizer):
    source = parquet_folder(tmp_path / "data", DOCUMENTS)
    whole = DataConfig(source=source, seq_len=16, streaming=False)
    train = reference_blocks(DOCUMENTS[:36], tokenizer, 16)
    spread = [train[i] for i in torch.linspace(0, len(train) - 1, 5).long().tolist()]
    assert calibration_sequences(whole, tokenizer, 5).tolist() == spread  # spread evenly, as over a local text
    streamed = DataConfig(source=source, seq_len=16, eval_documents=6, shuffle_buffer=0)
    assert calibration_sequences(streamed, tokenizer, 5).tolist() == reference_blocks(DOCUMENTS[6:], tokenizer, 16)[:5]
    with pytest.raises(ValueError, match=rf"^{source} ran out after {len(train)} sequences of 16 tokens"):
        calibration_sequences(whole, tokenizer, len(train) + 1)

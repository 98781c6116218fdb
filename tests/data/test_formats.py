import json

import pytest

from bridgevlm.data.captions import caption_pairs
from bridgevlm.data.formats import DataFormatError, read_conversations, read_records


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_json_list_and_jsonl(tmp_path):
    records = [{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]},
               {"id": "b", "conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "r2"}]}]
    as_json = _write(tmp_path / "d.json", json.dumps(records))
    as_jsonl = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_conversations(as_json) == records
    assert read_conversations(as_jsonl) == records


def test_malformed_json_names_file_and_line(tmp_path):
    # the stray comma is on line 3 of the file
    path = _write(tmp_path / "bad.json", '[\n {"id": 1},\n {"id": 2},,\n]\n')
    with pytest.raises(DataFormatError) as info:
        read_records(path)
    assert f"{path}:3:" in str(info.value)


def test_malformed_jsonl_line_names_line_number(tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"id": 1}\n{"id": 2}\n{"id": 3\n{"id": 4}\n')
    with pytest.raises(DataFormatError) as info:
        read_records(path)
    assert f"{path}:3:" in str(info.value)


def test_non_list_json(tmp_path):
    path = _write(tmp_path / "dict.json", '{"id": 1}')
    with pytest.raises(DataFormatError, match="expected a JSON list.*dict"):
        read_records(path)


def test_non_object_sample(tmp_path):
    path = _write(tmp_path / "list.json", '[{"id": 1}, "oops"]')
    with pytest.raises(DataFormatError, match="sample 1 is a str"):
        read_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        read_records(tmp_path / "absent.json")


def test_sample_without_conversations_names_index_and_id(tmp_path):
    records = [{"id": "ok", "conversations": [{"from": "human", "value": "q"}]}, {"id": "scene_42", "image": "x.png"}]
    path = _write(tmp_path / "d.json", json.dumps(records))
    with pytest.raises(DataFormatError) as info:
        read_conversations(path)
    message = str(info.value)
    assert str(path) in message and "sample 1" in message and "'scene_42'" in message


@pytest.mark.parametrize("record, fragment", [
    ({"id": "x", "conversations": []}, "no 'conversations'"),
    ({"id": "x", "conversations": [{"from": "human"}]}, "turn 0 needs"),
    ({"id": "x", "conversations": [{"from": "human", "value": "q"}, "text"]}, "turn 1 needs"),
    ({"id": "x", "image": 3, "conversations": [{"from": "human", "value": "q"}]}, "'image' must be"),
])
def test_bad_conversation_records(tmp_path, record, fragment):
    path = _write(tmp_path / "d.json", json.dumps([record]))
    with pytest.raises(DataFormatError, match=fragment):
        read_conversations(path)


def test_caption_pairs_pick_the_gpt_reply(tmp_path):
    records = [
        {"id": "0", "image": "train/0.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a red circle."}]},
        {"id": "1", "image": "train/1.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in this picture?"}, {"from": "gpt", "value": "a blue star."},
            {"from": "human", "value": "more?"}, {"from": "gpt", "value": "no."}]},
    ]
    path = _write(tmp_path / "c.json", json.dumps(records))
    assert caption_pairs(path) == [("train/0.png", "a red circle."), ("train/1.png", "a blue star.")]


def test_caption_pairs_errors(tmp_path):
    no_image = _write(tmp_path / "a.json", json.dumps([{"id": "q", "conversations": [{"from": "gpt", "value": "c"}]}]))
    with pytest.raises(DataFormatError, match="sample 0.*'q'.*no 'image'"):
        caption_pairs(no_image)
    no_reply = _write(tmp_path / "b.json", json.dumps(
        [{"id": "r", "image": "x.png", "conversations": [{"from": "human", "value": "<image>"}]}]))
    with pytest.raises(DataFormatError, match="sample 0.*'r'.*no caption"):
        caption_pairs(no_reply)


def test_caption_pairs_reads_coco_captions(tmp_path):
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "000007.jpg"}, {"id": 9, "file_name": "000009.jpg"}],
        "annotations": [{"id": 1, "image_id": 9, "caption": "A dog on a sofa. "},
                        {"id": 2, "image_id": 7, "caption": "Two cats."},
                        {"id": 3, "image_id": 9, "caption": "A brown dog."}],
    }))
    assert caption_pairs(path) == [("000009.jpg", "A dog on a sofa."), ("000007.jpg", "Two cats."),
                                   ("000009.jpg", "A brown dog.")]


def test_coco_captions_errors_name_the_annotation(tmp_path):
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 5, "caption": "x"}]}))
    with pytest.raises(DataFormatError, match=r"annotations\[1\] refers to image_id 5"):
        caption_pairs(path)
    path.write_text(json.dumps({"info": {}}))
    with pytest.raises(DataFormatError, match="COCO captions file"):
        caption_pairs(path)

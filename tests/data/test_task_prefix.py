from bridgevlm.data.task_prefix import prefix_user_turns

RECORD = {"id": "a", "image": "x.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat colour is the star?"}, {"from": "gpt", "value": "red"},
    {"from": "human", "value": "And the circle?"}, {"from": "gpt", "value": "blue"}]}


def test_every_user_turn_is_prefixed_after_the_image_tag_and_replies_are_untouched():
    (out,) = prefix_user_turns([RECORD], "[VQA:Shapes]")
    assert [t["value"] for t in out["conversations"]] == [
        "<image>\n[VQA:Shapes] What colour is the star?", "red", "[VQA:Shapes] And the circle?", "blue"]
    assert out["id"] == "a" and out["image"] == "x.png"
    assert RECORD["conversations"][0]["value"] == "<image>\nWhat colour is the star?"  # the input is not modified


def test_chat_style_roles_and_a_tag_without_line_break():
    record = {"conversations": [{"from": "user", "value": "<image>Describe."}, {"from": "assistant", "value": "ok"}]}
    (out,) = prefix_user_turns([record], "[Caption:Shapes]")
    assert out["conversations"][0]["value"] == "<image>[Caption:Shapes] Describe."


def test_an_empty_prefix_changes_nothing():
    assert prefix_user_turns([RECORD], "") == [RECORD]

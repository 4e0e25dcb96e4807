"""The mechanism table's computed reading (bench/report.py): pure arithmetic on the cells' facts."""

from bench.report import mechanism_reading


def level(overlap, ours, lora, full):
    return {"overlap": overlap, "gains": {"sla_single": ours, "lora_qv_r8": lora, "full_ft": full}}


def test_mechanism_seen_only_where_structure_moves_and_ours_gains_most():
    seeds = [0.5, 0.6, 0.55]  # seed-to-seed overlap 0.55 ± 0.05
    levels = {
        "char+word 0.1": level([0.1, 0.2], [5.0, 6.0], [1.0, 1.0], [2.0, 2.0]),  # moved and gained
        "char+word 0.2": level([0.6], [5.0], [1.0], [2.0]),  # gained, structure within seed spread
        "word 0.1": level([0.1], [-0.1], [-0.5], [-0.9]),  # moved; ours loses least but gains nothing
    }
    text = mechanism_reading(seeds, levels)
    assert "at 2 of 3 levels (char and word noise 10 %; word noise only 10 %)" in text
    assert "methods at 2 of 3 (char and word noise 10 %; char and word noise 20 %)" in text
    assert "seen at char and word noise 10 %." in text


def test_mechanism_not_seen_and_waits():
    levels = {"char+word 0.1": level([0.5], [1.0], [3.0], [2.0])}
    assert mechanism_reading([0.5, 0.5], levels).endswith("not seen at this scale.")
    assert mechanism_reading([], levels).startswith("Reading: waits")

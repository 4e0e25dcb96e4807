"""The mechanism table's computed reading (bench/report.py): pure arithmetic on the cells' facts."""

from bench.report import Claims, accuracy_claims, mechanism_reading, noise_claims


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


def test_word_noise_reason_names_the_methods_that_stay_within_the_line():
    def run(ours, lora, full):
        return {m: {0.0: [80.0], 0.1: [80.0 + d]} for m, d in
                (("sla_single", ours), ("lora_qv_r8", lora), ("full_ft", full))}  # fmt: skip

    c = Claims()
    noise_claims(c, {"word": run(-2.1, -1.8, -2.4)}, {})
    (reason,) = [w for w in c.why if "word noise only" in w]
    assert "(not held)" in reason
    assert "(the others lose 1.8-2.4; within the line: PEFT LoRA r=8 (q,v))" in reason

    c = Claims()
    noise_claims(c, {"word": run(-2.1, -2.2, -2.4)}, {})
    (reason,) = [w for w in c.why if "word noise only" in w]
    assert "(the others lose 2.2-2.4)." in reason


def test_a_margin_below_the_tolerance_reads_as_a_tie_not_a_win():
    def m(avg):
        return {"avg": avg, "kept": [0.2, 0.2], "trainable": [1.46, 1.46]}

    main = {"sla_single": m([86.4, 86.4]), "sla_multi": m([85.6, 85.6]), "full_ft": m([86.5, 86.5]),
            "lora_qv_r8": m([85.4, 85.4]), "lora_matched": m([86.0, 86.0])}  # fmt: skip
    c = Claims()
    accuracy_claims(c, main, {})
    why = {w.split("**")[1]: w for w in c.why}
    assert (
        "beats putting them all on q and v"
        in why["ours, single task ≥ PEFT LoRA r=8 (q,v) (MiniLM, average of three tasks)"]
    )
    matched = why["ours, single task ≥ PEFT LoRA (q,v) at ours' kept size (MiniLM, average of three tasks)"]
    assert "A tie within the tolerance" in matched and "margin here is +0.4" in matched
    assert why["ours, multi-task ≥ PEFT LoRA r=8 (q,v) (MiniLM, average of three tasks)"].endswith(
        "margin +0.2, a tie within the tolerance."
    )

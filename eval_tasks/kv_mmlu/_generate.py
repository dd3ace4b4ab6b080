"""Writes the kv_mmlu task files: one task per subject and variant, a group per variant.

Run from anywhere: ``python eval_tasks/kv_mmlu/_generate.py``. The output is committed; rerun after editing.
"""

from pathlib import Path

SUBJECTS = """abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry
college_computer_science college_mathematics college_medicine college_physics computer_security conceptual_physics
econometrics electrical_engineering elementary_mathematics formal_logic global_facts high_school_biology
high_school_chemistry high_school_computer_science high_school_european_history high_school_geography
high_school_government_and_politics high_school_macroeconomics high_school_mathematics high_school_microeconomics
high_school_physics high_school_psychology high_school_statistics high_school_us_history high_school_world_history
human_aging human_sexuality international_law jurisprudence logical_fallacies machine_learning management marketing
medical_genetics miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory professional_accounting
professional_law professional_medicine professional_psychology public_relations security_studies sociology
us_foreign_policy virology world_religions""".split()

T = "kvcache_plugins.eval"
HERE = Path(__file__).resolve().parent

TEMPLATES = {
    "_kv_mmlu_template.yaml": f"""# MMLU, log-likelihood variant: the model scores the letters A-D after the question and its choices.
custom_dataset: !function {T}.tasks.mmlu_subject_rows
test_split: test
output_type: multiple_choice
doc_to_text: !function {T}.qa.mmlu_prompt
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: !function {T}.tasks.mmlu_target
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
metadata:
  version: 1.0
  question_marker: "Question:"
""",
    "_kv_mmlu_generative_template.yaml": f"""# MMLU, generative variant: the model writes the letter; acc is 1 when the first letter A-D is right.
custom_dataset: !function {T}.tasks.mmlu_subject_rows
test_split: test
output_type: generate_until
doc_to_text: !function {T}.qa.mmlu_prompt
doc_to_target: !function {T}.tasks.mmlu_letter_target
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
process_results: !function {T}.tasks.mmlu_generative_results
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
metadata:
  version: 1.0
  question_marker: "Question:"
""",
}


def main() -> None:
    for name, text in TEMPLATES.items():
        (HERE / name).write_text(text)
    for variant, template in (("kv_mmlu", "_kv_mmlu_template.yaml"), ("kv_mmlu_generative", "_kv_mmlu_generative_template.yaml")):
        folder = HERE / variant.replace("kv_mmlu", "subjects", 1)
        folder.mkdir(exist_ok=True)
        for subject in SUBJECTS:
            (folder / f"{variant}_{subject}.yaml").write_text(
                f"include: ../{template}\ntask: {variant}_{subject}\ndataset_kwargs:\n  subject: {subject}\n"
            )
        tasks = "\n".join(f"  - {variant}_{s}" for s in SUBJECTS)
        (HERE / f"{variant}.yaml").write_text(
            f"# {len(SUBJECTS)} MMLU subjects; acc is averaged weighted by each subject's size.\n"
            f"group: {variant}\ntask:\n{tasks}\naggregate_metric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    weight_by_size: true\nmetadata:\n  version: 1.0\n"
        )


if __name__ == "__main__":
    main()

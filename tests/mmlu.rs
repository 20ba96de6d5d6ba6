//! MMLU scoring end to end on a tiny model, against the picks transformers makes with the same
//! prompts (tests/fixtures/mmlu/make_fixture.py).

use serde_json::Value;
use std::path::{Path, PathBuf};
use sun_assistant::mmlu::{load_questions, score};
use sun_assistant::model::{Llama, LoadOptions};
use sun_assistant::tokenizer::Tokenizer;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn picks(expected: &Value, key: &str) -> Vec<usize> {
    expected[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn picks_and_accuracy_match_transformers() {
    let expected: Value =
        serde_json::from_slice(&std::fs::read(fixture("mmlu/expected.json")).unwrap()).unwrap();
    let questions = load_questions(&fixture("mmlu/questions.jsonl")).unwrap();
    assert_eq!(questions.len(), 7, "the header row is skipped");
    let answers = picks(&expected, "answers");
    assert_eq!(
        questions.iter().map(|q| q.answer).collect::<Vec<_>>(),
        answers
    );
    let tok = Tokenizer::from_file(&fixture("lora_grad/tokenizer.json")).unwrap();
    let model = Llama::load(
        &fixture("tiny_llama/untied"),
        &LoadOptions {
            quiet: true,
            quantize: false,
        },
    )
    .unwrap();
    for shots in [0, 1] {
        let want = picks(&expected, &format!("shots_{shots}"));
        let report = score(&model, &tok, &questions, shots, None, true).unwrap();
        assert_eq!(report.picks, want, "{shots}-shot picks");
        let correct = want.iter().zip(&answers).filter(|(p, a)| p == a).count();
        assert_eq!(report.total(), 7);
        assert!(
            (report.accuracy() - correct as f64 / 7.0).abs() < 1e-12,
            "{shots}-shot accuracy"
        );
        let astronomy = report.subjects["astronomy"];
        assert_eq!(astronomy.1, 4);
    }
    let limited = score(&model, &tok, &questions, 0, Some(3), true).unwrap();
    assert_eq!(limited.total(), 3);
}

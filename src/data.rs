//! Instruction datasets: JSON/JSONL rows in the formats qlora.py accepts, turned into token ids
//! with labels (the loss mask).
//!
//! | format | fields | source (no loss) | target (loss) |
//! | --- | --- | --- | --- |
//! | alpaca | instruction, input, output | BOS + Alpaca prompt | output + EOS |
//! | self-instruct | prompt, completion | BOS + prompt | completion + EOS |
//! | input-output | input, output | BOS + input | output + EOS |
//! | oasst | text (`### Human: ... ### Assistant: ...`) | BOS + human turns | assistant turns (+ EOS) |
//! | hh-rlhf | chosen (`\n\nHuman: ... \n\nAssistant: ...`) | BOS + human turns | assistant turns (+ EOS) |
//! | chat | conversations [{from, value}] or messages [{role, content}] | the chat template | assistant turns |
//!
//! As in qlora.py, source and target are tokenized separately (no special tokens added, but
//! special-token text such as `<s>` is recognised), the source truncated to `source_max_len`
//! tokens and the target to `target_max_len`. Chat rows are rendered with the model's chat
//! template and cut at `source_max_len + target_max_len` tokens.

use crate::chat::{ChatFormat, Message, Segment};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::tokenizer::Tokenizer;
use serde_json::{Map, Value};
use std::path::Path;

/// The label of a token that carries no loss (PyTorch's ignore_index).
pub const IGNORE_INDEX: i64 = -100;

/// qlora.py's Alpaca prompt with an input.
const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ";
/// qlora.py's Alpaca prompt without an input.
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ";

/// The dataset formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetFormat {
    /// instruction / input / output.
    Alpaca,
    /// prompt / completion.
    SelfInstruct,
    /// input / output.
    InputOutput,
    /// OpenAssistant-Guanaco `text`.
    Oasst,
    /// Anthropic HH-RLHF `chosen`.
    HhRlhf,
    /// ShareGPT `conversations` or `messages` lists.
    Chat,
}

impl DatasetFormat {
    /// Every format with its `--dataset-format` name.
    pub const NAMES: [(&'static str, DatasetFormat); 6] = [
        ("alpaca", DatasetFormat::Alpaca),
        ("self-instruct", DatasetFormat::SelfInstruct),
        ("input-output", DatasetFormat::InputOutput),
        ("oasst", DatasetFormat::Oasst),
        ("hh-rlhf", DatasetFormat::HhRlhf),
        ("chat", DatasetFormat::Chat),
    ];

    /// The `--dataset-format` name.
    pub fn name(self) -> &'static str {
        DatasetFormat::NAMES
            .iter()
            .find(|(_, f)| *f == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    /// Parses a `--dataset-format` name.
    pub fn from_name(name: &str) -> Result<Self> {
        DatasetFormat::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                let names: Vec<&str> = DatasetFormat::NAMES.iter().map(|(n, _)| *n).collect();
                Error::invalid(format!(
                    "--dataset-format: {name:?} is not one of {}",
                    names.join(", ")
                ))
            })
    }

    /// Guesses the format from a row's fields.
    pub fn detect(row: &Map<String, Value>) -> Option<Self> {
        let has = |k: &str| row.contains_key(k);
        if has("conversations") || has("messages") {
            Some(DatasetFormat::Chat)
        } else if has("instruction") && has("output") {
            Some(DatasetFormat::Alpaca)
        } else if has("prompt") && has("completion") {
            Some(DatasetFormat::SelfInstruct)
        } else if has("input") && has("output") {
            Some(DatasetFormat::InputOutput)
        } else if has("text") {
            Some(DatasetFormat::Oasst)
        } else if has("chosen") {
            Some(DatasetFormat::HhRlhf)
        } else {
            None
        }
    }
}

/// One training example as text: source and target pieces in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The pieces; `trainable` ones carry the loss.
    pub segments: Vec<Segment>,
    /// Whether BOS goes before and EOS after (the qlora.py formats), or the chat template
    /// already wrote its own markers.
    pub add_bos_eos: bool,
}

/// Reads the rows of a JSON array file or a JSONL file.
pub fn read_rows(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let bytes = fsutil::read(path)?;
    let text =
        std::str::from_utf8(&bytes).map_err(|_| Error::format(path.display(), "not UTF-8 text"))?;
    let bad = |p: String| Error::format(path.display(), p);
    let values: Vec<Value> = if text.trim_start().starts_with('[') {
        match serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))? {
            Value::Array(items) => items,
            _ => unreachable!("starts with '['"),
        }
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| bad(format!("line {}: invalid JSON: {e}", i + 1)))
            })
            .collect::<Result<_>>()?
    };
    let rows = values
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Object(m) => Ok(m),
            _ => Err(bad(format!("row {i} is not a JSON object"))),
        })
        .collect::<Result<Vec<_>>>()?;
    if rows.is_empty() {
        return Err(bad("the dataset is empty".into()));
    }
    Ok(rows)
}

/// Loads a dataset file as examples, detecting the format unless `format` is given.
/// Returns the format used.
pub fn load_examples(
    path: &Path,
    format: Option<DatasetFormat>,
    chat: &ChatFormat,
) -> Result<(DatasetFormat, Vec<Example>)> {
    let rows = read_rows(path)?;
    let format = match format {
        Some(f) => f,
        None => DatasetFormat::detect(&rows[0]).ok_or_else(|| {
            let fields: Vec<&str> = rows[0].keys().map(String::as_str).collect();
            Error::format(
                path.display(),
                format!("cannot tell the dataset format from row 0's fields {fields:?}; pass --dataset-format"),
            )
        })?,
    };
    let examples = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            row_to_example(row, format, chat)
                .map_err(|e| Error::format(path.display(), format!("row {i}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((format, examples))
}

fn field<'a>(row: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    match row.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(Value::Null) | None => Err(format!("missing field {name:?}")),
        Some(_) => Err(format!("field {name:?} is not a string")),
    }
}

fn source_target(source: String, target: &str) -> Example {
    Example {
        segments: vec![
            Segment {
                text: source,
                trainable: false,
            },
            Segment {
                text: target.to_string(),
                trainable: true,
            },
        ],
        add_bos_eos: true,
    }
}

fn row_to_example(
    row: &Map<String, Value>,
    format: DatasetFormat,
    chat: &ChatFormat,
) -> Result<Example, String> {
    match format {
        DatasetFormat::Alpaca => {
            let instruction = field(row, "instruction")?;
            let input = row.get("input").and_then(Value::as_str).unwrap_or("");
            let prompt = if input.is_empty() {
                ALPACA_NO_INPUT
            } else {
                ALPACA_WITH_INPUT
            };
            let source = prompt
                .replace("{instruction}", instruction)
                .replace("{input}", input);
            Ok(source_target(source, field(row, "output")?))
        }
        DatasetFormat::SelfInstruct => Ok(source_target(
            field(row, "prompt")?.to_string(),
            field(row, "completion")?,
        )),
        DatasetFormat::InputOutput => Ok(source_target(
            field(row, "input")?.to_string(),
            field(row, "output")?,
        )),
        DatasetFormat::Oasst => Ok(turns_example(
            field(row, "text")?,
            "### Human:",
            "### Assistant:",
        )),
        DatasetFormat::HhRlhf => Ok(turns_example(
            field(row, "chosen")?,
            "\n\nHuman:",
            "\n\nAssistant:",
        )),
        DatasetFormat::Chat => {
            let messages = chat_messages(row)?;
            if !messages.iter().any(|m| m.role == "assistant") {
                return Err("the conversation has no assistant turn to learn from".into());
            }
            let segments = chat.render(&messages, false).map_err(|e| e.to_string())?;
            Ok(Example {
                segments,
                add_bos_eos: false,
            })
        }
    }
}

/// Splits a transcript into human (source) and assistant (target) pieces at the markers; the
/// text before the first marker counts as source.
fn turns_example(text: &str, human: &str, assistant: &str) -> Example {
    let mut segments: Vec<Segment> = Vec::new();
    let mut rest = text;
    let mut trainable = false;
    loop {
        // In a human turn look for the assistant marker, and the other way round.
        let marker = if trainable { human } else { assistant };
        let (piece, next) = match rest.find(marker) {
            Some(at) if trainable => (&rest[..at], &rest[at..]),
            Some(at) => (&rest[..at + marker.len()], &rest[at + marker.len()..]),
            None => (rest, ""),
        };
        if !piece.is_empty() {
            segments.push(Segment {
                text: piece.to_string(),
                trainable,
            });
        }
        if next.is_empty() {
            break;
        }
        rest = next;
        trainable = !trainable;
    }
    Example {
        segments,
        add_bos_eos: true,
    }
}

fn chat_messages(row: &Map<String, Value>) -> Result<Vec<Message>, String> {
    let (list, role_key, content_key) = match (row.get("conversations"), row.get("messages")) {
        (Some(v), _) => (v, "from", "value"),
        (None, Some(v)) => (v, "role", "content"),
        (None, None) => return Err("missing field \"conversations\" or \"messages\"".into()),
    };
    let items = list.as_array().ok_or("the conversation is not a list")?;
    if items.is_empty() {
        return Err("the conversation is empty".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let m = m
                .as_object()
                .ok_or_else(|| format!("message {i} is not an object"))?;
            let role = field(m, role_key).map_err(|e| format!("message {i}: {e}"))?;
            let content = field(m, content_key).map_err(|e| format!("message {i}: {e}"))?;
            let role = match role {
                "human" | "user" => "user",
                "gpt" | "assistant" | "bot" => "assistant",
                "system" => "system",
                other => return Err(format!("message {i}: unknown role {other:?}")),
            };
            Ok(Message::new(role, content))
        })
        .collect()
}

/// One tokenized example: ids and the label of each position (`IGNORE_INDEX` where no loss).
/// As in Hugging Face, the logits at position t are scored against `labels[t + 1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedExample {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels: the id itself where the loss applies, `IGNORE_INDEX` elsewhere.
    pub labels: Vec<i64>,
}

impl TokenizedExample {
    /// Positions whose next token is scored: the number of loss terms.
    pub fn target_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Truncation and masking rules for [`tokenize_example`].
#[derive(Clone, Copy, Debug)]
pub struct TokenizeOptions {
    /// Most source tokens (BOS included).
    pub source_max_len: usize,
    /// Most target tokens (EOS included).
    pub target_max_len: usize,
    /// Put the loss on the source tokens too.
    pub train_on_source: bool,
}

/// Tokenizes an example as qlora.py's collator does.
pub fn tokenize_example(tok: &Tokenizer, ex: &Example, opts: TokenizeOptions) -> TokenizedExample {
    let mut source: Vec<u32> = Vec::new();
    let mut target: Vec<(u32, bool)> = Vec::new();
    if ex.add_bos_eos {
        source.extend(tok.bos_id());
    }
    // Everything up to the first trainable piece is the source; the rest is the target, whose
    // untrainable pieces (later human turns) stay masked.
    let first_trainable = ex
        .segments
        .iter()
        .position(|s| s.trainable)
        .unwrap_or(ex.segments.len());
    for seg in &ex.segments[..first_trainable] {
        source.extend(tok.encode(&seg.text, false));
    }
    for seg in &ex.segments[first_trainable..] {
        target.extend(
            tok.encode(&seg.text, false)
                .into_iter()
                .map(|id| (id, seg.trainable)),
        );
    }
    if ex.add_bos_eos {
        target.extend(tok.eos_id().map(|id| (id, true)));
    }
    if ex.add_bos_eos {
        source.truncate(opts.source_max_len);
        target.truncate(opts.target_max_len);
    } else {
        let total = opts.source_max_len + opts.target_max_len;
        source.truncate(total);
        target.truncate(total - source.len());
    }
    let label = |id: u32, trainable: bool| {
        if trainable {
            i64::from(id)
        } else {
            IGNORE_INDEX
        }
    };
    let mut input_ids = Vec::with_capacity(source.len() + target.len());
    let mut labels = Vec::with_capacity(source.len() + target.len());
    for &id in &source {
        input_ids.push(id);
        labels.push(label(id, opts.train_on_source));
    }
    for &(id, trainable) in &target {
        input_ids.push(id);
        labels.push(label(id, trainable || opts.train_on_source));
    }
    TokenizedExample { input_ids, labels }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn detects_each_format() {
        let cases = [
            (
                r#"{"instruction":"a","input":"","output":"b"}"#,
                DatasetFormat::Alpaca,
            ),
            (
                r#"{"prompt":"a","completion":"b"}"#,
                DatasetFormat::SelfInstruct,
            ),
            (r#"{"input":"a","output":"b"}"#, DatasetFormat::InputOutput),
            (
                "{\"text\":\"### Human: a### Assistant: b\"}",
                DatasetFormat::Oasst,
            ),
            (
                r#"{"chosen":"\n\nHuman: a\n\nAssistant: b"}"#,
                DatasetFormat::HhRlhf,
            ),
            (
                r#"{"conversations":[{"from":"human","value":"a"}]}"#,
                DatasetFormat::Chat,
            ),
            (
                r#"{"messages":[{"role":"user","content":"a"}]}"#,
                DatasetFormat::Chat,
            ),
        ];
        for (json, want) in cases {
            assert_eq!(DatasetFormat::detect(&row(json)), Some(want), "{json}");
        }
        assert_eq!(DatasetFormat::detect(&row(r#"{"q":"a"}"#)), None);
    }

    #[test]
    fn alpaca_uses_qlora_prompts() {
        let chat = ChatFormat::Guanaco;
        let ex = row_to_example(
            &row(r#"{"instruction":"Add.","input":"1+1","output":"2"}"#),
            DatasetFormat::Alpaca,
            &chat,
        )
        .unwrap();
        assert_eq!(
            ex.segments[0].text,
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n1+1\n\n### Response: "
        );
        assert_eq!(
            ex.segments[1],
            Segment {
                text: "2".into(),
                trainable: true
            }
        );
        let err = row_to_example(&row(r#"{"instruction":"x"}"#), DatasetFormat::Alpaca, &chat)
            .unwrap_err();
        assert!(err.contains("output"), "{err}");
    }

    #[test]
    fn oasst_puts_loss_on_assistant_turns() {
        let ex = turns_example(
            "### Human: Hi### Assistant: Hello### Human: Bye### Assistant: Ciao",
            "### Human:",
            "### Assistant:",
        );
        let pieces: Vec<(&str, bool)> = ex
            .segments
            .iter()
            .map(|s| (s.text.as_str(), s.trainable))
            .collect();
        assert_eq!(
            pieces,
            vec![
                ("### Human: Hi### Assistant:", false),
                (" Hello", true),
                ("### Human: Bye### Assistant:", false),
                (" Ciao", true)
            ]
        );
    }
}

//! Parity with Hugging Face `tokenizers` on LLaMA-2, LLaMA-3 and SmolLM2: ids (with and without
//! special tokens), decoded text, streaming decode and random id lists, against the outputs
//! that tests/fixtures/tokenizers/make_fixtures.py recorded from the Python library.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use sun_assistant::tokenizer::{DecodeStream, Tokenizer};

const NAMES: [&str; 3] = ["llama2", "llama3", "smollm2"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers")
}

fn load(name: &str) -> Tokenizer {
    Tokenizer::from_file(&fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn strings() -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join("strings.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn jsonl(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join(file)).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// One expected row of expected_<name>.jsonl, with the implied fields filled in.
struct Expected {
    ids: Vec<u32>,
    plain: Vec<u32>,
    text: String,
    skip: String,
    stream: Option<Vec<String>>,
}

fn expected(row: &Value, input: &str) -> Expected {
    let plain = ids_of(&row["plain"]);
    let ids = if let Some(ids) = row.get("ids") {
        ids_of(ids)
    } else if let Some(around) = row.get("around") {
        let mut ids = ids_of(&around[0]);
        ids.extend(&plain);
        ids.extend(ids_of(&around[1]));
        ids
    } else {
        plain.clone()
    };
    let text_or_input = |key: &str| {
        row.get(key)
            .map_or(input.to_owned(), |v| v.as_str().unwrap().to_owned())
    };
    Expected {
        ids,
        plain,
        text: text_or_input("text"),
        skip: text_or_input("skip"),
        stream: row.get("stream").map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_owned())
                .collect()
        }),
    }
}

/// The tokens of `ids`, to show where two encodings part.
fn spelled(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&id| format!("{id}:{:?}", t.id_to_token(id).unwrap_or("?")))
        .collect()
}

fn check_parity(name: &str) {
    let t = load(name);
    let inputs = strings();
    let rows = jsonl(&format!("expected_{name}.jsonl"));
    assert_eq!(inputs.len(), rows.len(), "{name}: fixture rows");
    assert!(inputs.len() >= 2000);
    let mut failures = Vec::new();
    let mut tokens = 0usize;
    let start = std::time::Instant::now();
    for (i, (input, row)) in inputs.iter().zip(&rows).enumerate() {
        let want = expected(row, input);
        let plain = t.encode(input, false);
        let ids = t.encode(input, true);
        tokens += plain.len();
        let mut problems = Vec::new();
        if plain != want.plain {
            problems.push(format!(
                "encode(add_special_tokens=false)\n   got  {:?}\n   want {:?}",
                spelled(&t, &plain),
                spelled(&t, &want.plain)
            ));
        }
        if ids != want.ids {
            problems.push(format!(
                "encode(add_special_tokens=true)\n   got  {ids:?}\n   want {:?}",
                want.ids
            ));
        }
        let text = t.decode(&want.ids, false);
        if text != want.text {
            problems.push(format!(
                "decode(skip_special=false)\n   got  {text:?}\n   want {:?}",
                want.text
            ));
        }
        let skip = t.decode(&want.ids, true);
        if skip != want.skip {
            problems.push(format!(
                "decode(skip_special=true)\n   got  {skip:?}\n   want {:?}",
                want.skip
            ));
        }
        if let Some(want_stream) = &want.stream {
            let mut stream = DecodeStream::new(&t, false);
            let got: Vec<String> = want.ids.iter().map(|&id| stream.push(id)).collect();
            if &got != want_stream {
                problems.push(format!(
                    "DecodeStream\n   got  {got:?}\n   want {want_stream:?}"
                ));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "string #{i} {input:?}:\n  {}",
                problems.join("\n  ")
            ));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{name}: {} strings, {tokens} tokens encoded twice in {secs:.2}s",
        inputs.len()
    );
    assert!(
        failures.is_empty(),
        "{name}: {} of {} strings differ from HF tokenizers; first:\n{}",
        failures.len(),
        inputs.len(),
        failures[0]
    );
}

#[test]
fn llama2_matches_hf() {
    check_parity("llama2");
}

#[test]
fn llama3_matches_hf() {
    check_parity("llama3");
}

#[test]
fn smollm2_matches_hf() {
    check_parity("smollm2");
}

#[test]
fn random_id_lists_decode_like_hf() {
    for name in NAMES {
        let t = load(name);
        for (i, row) in jsonl(&format!("decode_{name}.jsonl")).iter().enumerate() {
            let ids = ids_of(&row["ids"]);
            for (skip, key) in [(false, "text"), (true, "skip")] {
                let want = row[key].as_str().unwrap();
                let got = t.decode(&ids, skip);
                assert_eq!(
                    got, want,
                    "{name} decode case #{i} {ids:?} skip_special={skip}"
                );
            }
        }
    }
}

#[test]
fn special_ids_vocab_and_template() {
    let l2 = load("llama2");
    assert_eq!(
        (l2.bos_id(), l2.eos_id(), l2.eos_ids()),
        (Some(1), Some(2), vec![2])
    );
    assert_eq!(l2.vocab_size(), 32000);
    assert_eq!(l2.chat_template(), None);
    let l3 = load("llama3");
    assert_eq!((l3.bos_id(), l3.eos_id()), (Some(128000), Some(128001)));
    assert_eq!(l3.eos_ids(), [128001, 128009]);
    assert_eq!(l3.vocab_size(), 128256);
    assert!(l3.chat_template().unwrap().contains("<|start_header_id|>"));
    let smol = load("smollm2");
    assert_eq!((smol.bos_id(), smol.eos_id()), (Some(1), Some(2)));
    assert_eq!(smol.eos_ids(), [2, 0]);
    assert_eq!(smol.vocab_size(), 49152);
    assert!(smol.chat_template().unwrap().contains("<|im_start|>"));
    assert_eq!(smol.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(smol.id_to_token(2), Some("<|im_end|>"));
    assert_eq!(smol.id_to_token(49152), None);
}

#[test]
fn adversarial_inputs_never_panic() {
    let nasty: Vec<String> = vec![
        "\u{FFFD}".repeat(100),
        "<".repeat(1000),
        "<|im_start|".repeat(50),
        "<s".repeat(300) + ">",
        "\u{10FFFF}\u{E000}\u{0}".into(),
        "'".repeat(500),
        "\r".repeat(300) + &" ".repeat(300),
        "9".repeat(5000),
        "x".repeat(20_000),
        "é".repeat(3000),
        "\u{0301}".repeat(2000),
        "▁".repeat(500),
    ];
    for name in NAMES {
        let t = load(name);
        for s in &nasty {
            let ids = t.encode(s, true);
            let _ = t.decode(&ids, false);
        }
        let ids_lists: [&[u32]; 4] = [
            &[u32::MAX, 0, u32::MAX - 1],
            &[3, 4, 5, 6, 200, 201, 202],
            &[],
            &[0; 64],
        ];
        for ids in ids_lists {
            let _ = t.decode(ids, true);
            let mut stream = DecodeStream::new(&t, false);
            for &id in ids {
                let _ = stream.push(id);
            }
        }
    }
}

fn sun_tokenize(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sun"))
        .arg("tokenize")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn cli_encodes_and_decodes_lines() {
    let dir = fixtures().join("llama2");
    let dir = dir.to_str().unwrap();
    let inputs = strings();
    let rows = jsonl("expected_llama2.jsonl");
    // Single-line strings only: the command reads one string per line.
    let picked: Vec<usize> = (0..inputs.len())
        .filter(|&i| !inputs[i].contains(['\n', '\r']) && !inputs[i].is_empty())
        .step_by(37)
        .collect();
    assert!(picked.len() > 10);
    let stdin: String = picked.iter().map(|&i| format!("{}\n", inputs[i])).collect();
    let (ok, stdout, stderr) = sun_tokenize(&["--tokenizer", dir], &stdin);
    assert!(ok, "{stderr}");
    let want_lines: Vec<Vec<u32>> = picked
        .iter()
        .map(|&i| expected(&rows[i], &inputs[i]).ids)
        .collect();
    let got_lines: Vec<Vec<u32>> = stdout
        .lines()
        .map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(got_lines, want_lines);

    let (ok, decoded, stderr) =
        sun_tokenize(&["--tokenizer", dir, "--decode", "--no-special"], &stdout);
    assert!(ok, "{stderr}");
    let want: Vec<String> = picked
        .iter()
        .map(|&i| expected(&rows[i], &inputs[i]).skip)
        .collect();
    assert_eq!(decoded.lines().collect::<Vec<_>>(), want);

    let (ok, plain, _) = sun_tokenize(
        &[
            "--tokenizer",
            &format!("{dir}/tokenizer.json"),
            "--no-special",
        ],
        "Hello world\n",
    );
    assert!(ok);
    let want = expected(&rows[15], &inputs[15]).plain;
    assert_eq!(inputs[15], "Hello world");
    let want: Vec<String> = want.iter().map(u32::to_string).collect();
    assert_eq!(plain.trim_end(), want.join(" "));

    let (ok, _, stderr) = sun_tokenize(&["--tokenizer", dir, "--decode"], "1 2 x3\n");
    assert!(
        !ok && stderr.contains("line 1") && stderr.contains("x3"),
        "{stderr}"
    );
    let (ok, _, stderr) = sun_tokenize(&["--tokenizer", "/nonexistent/tok"], "");
    assert!(!ok && stderr.contains("/nonexistent/tok"), "{stderr}");
}

#[test]
fn added_token_flags_match_hf() {
    let text = std::fs::read_to_string(fixtures().join("added_flags.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<&str> = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for name in ["llama2", "smollm2"] {
        let expected = &fixture["expected"][name];
        let base = std::fs::read_to_string(fixtures().join(name).join("tokenizer.json")).unwrap();
        let mut json: Value = serde_json::from_str(&base).unwrap();
        let added = json["added_tokens"].as_array_mut().unwrap();
        let ids = ids_of(&expected["ids_of_tokens"]);
        for (token, id) in fixture["tokens"].as_array().unwrap().iter().zip(ids) {
            let mut token = token.clone();
            token["id"] = id.into();
            added.push(token);
        }
        let t = Tokenizer::from_json(&json.to_string(), None).unwrap();
        let rows = expected["rows"].as_array().unwrap();
        assert_eq!(rows.len(), cases.len());
        for (i, (case, row)) in cases.iter().zip(rows).enumerate() {
            let want = ids_of(&row["ids"]);
            let got = t.encode(case, true);
            assert_eq!(
                spelled(&t, &got),
                spelled(&t, &want),
                "{name} flagged case #{i} {case:?}"
            );
            assert_eq!(
                t.decode(&want, false),
                row["text"].as_str().unwrap(),
                "#{i}"
            );
            assert_eq!(t.decode(&want, true), row["skip"].as_str().unwrap(), "#{i}");
        }
    }
}

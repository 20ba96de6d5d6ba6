//! `sun serve` through real HTTP: the binary serves the tiny untied model of
//! tests/fixtures/tiny_llama with the byte-level tokenizer and the PEFT adapter of
//! tests/fixtures/lora_grad on 127.0.0.1, and a hand-written HTTP client checks that
//!
//! - answers (whole and streamed as server-sent events, chat and plain completions) equal what
//!   `sun generate` prints for the same prompt, adapter and settings;
//! - 200 malformed requests each get a 4xx with an OpenAI error object, and the server stays up;
//! - 100 concurrent requests each get their own answer, unmixed;
//! - silent clients time out, connections beyond the limit get 503, and a client that leaves
//!   mid-stream does not disturb the next one;
//! - the chat page, driven by headless Chromium when /usr/bin/chromium exists, shows the
//!   streamed answer.
//!
//! Every server is killed when its test ends; every socket has timeouts.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SUN: &str = env!("CARGO_BIN_EXE_sun");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn adapter() -> PathBuf {
    fixtures().join("lora_grad/ours")
}

/// A scratch folder under the target directory, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The untied tiny model with the fixture tokenizer beside it (no chat template: Guanaco).
fn model_dir(name: &str) -> PathBuf {
    let dir = scratch(name).join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for (from, file) in [
        ("tiny_llama/untied", "config.json"),
        ("tiny_llama/untied", "model.safetensors"),
        ("lora_grad", "tokenizer.json"),
        ("lora_grad", "tokenizer_config.json"),
    ] {
        std::fs::copy(fixtures().join(from).join(file), dir.join(file)).unwrap();
    }
    dir
}

/// A running `sun serve`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let log = model.with_file_name("serve.log");
        let mut child = Command::new(SUN)
            .arg("serve")
            .arg("--model")
            .arg(model)
            .arg("--adapter")
            .arg(adapter())
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("sun serve starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let addr = line
            .trim()
            .strip_prefix("http://")
            .and_then(|a| a.strip_suffix('/'))
            .map(str::to_string);
        let mut server = Server {
            child,
            addr: String::new(),
            log,
        };
        match addr {
            Some(addr) => server.addr = addr,
            None => panic!(
                "sun serve did not print its address ({line:?}); log: {}",
                server.log_text()
            ),
        }
        server
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(&self.addr).expect("connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
    }

    /// Sends `raw` (then ends the request side when `close_write`) and reads the response.
    fn exchange(&self, raw: &[u8], close_write: bool) -> Response {
        let mut stream = self.connect();
        // A server that answers early may reset the rest of a long write: read what came.
        let _ = stream.write_all(raw);
        if close_write {
            let _ = stream.shutdown(Shutdown::Write);
        }
        read_response(&mut stream)
    }

    fn get(&self, path: &str) -> Response {
        self.exchange(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
            false,
        )
    }

    fn post(&self, path: &str, body: &[u8]) -> Response {
        let mut raw = format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(body);
        self.exchange(&raw, false)
    }

    fn post_json(&self, path: &str, body: &Value) -> Response {
        self.post(path, body.to_string().as_bytes())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {:?} after {:?}",
                String::from_utf8_lossy(&self.body),
                self.head
            )
        })
    }

    /// The `data:` payloads of a server-sent-event body, in order.
    fn events(&self) -> Vec<String> {
        let text = String::from_utf8(self.body.clone()).expect("UTF-8 events");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                    .to_string()
            })
            .collect()
    }
}

/// Reads a whole response (the server closes the connection after each one).
fn read_response(stream: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        assert!(!raw.is_empty(), "no response: {e}");
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    Response {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    }
}

/// What `sun generate` prints for `prompt` with the adapter (its final newline removed).
fn sun_generate(model: &Path, prompt: &str, chat: bool, settings: &Settings) -> String {
    let mut cmd = Command::new(SUN);
    cmd.arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--adapter")
        .arg(adapter())
        .args(["--prompt", prompt, "--quiet"]);
    if chat {
        cmd.arg("--chat");
    }
    if let Some(system) = settings.system {
        cmd.args(["--system", system]);
    }
    cmd.args([
        "--max-new-tokens",
        &settings.max_tokens.to_string(),
        "--temperature",
        &settings.temperature.to_string(),
        "--top-p",
        &settings.top_p.to_string(),
        "--seed",
        &settings.seed.to_string(),
    ]);
    let out = cmd.output().expect("sun generate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    text.strip_suffix('\n')
        .expect("a final newline")
        .to_string()
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    max_tokens: usize,
    temperature: f32,
    top_p: f32,
    seed: u64,
    system: Option<&'static str>,
}

fn chat_body(prompt: &str, s: &Settings, stream: bool) -> Value {
    let mut messages = Vec::new();
    if let Some(system) = s.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": prompt}));
    json!({
        "model": "anything", "messages": messages, "max_tokens": s.max_tokens,
        "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed, "stream": stream,
    })
}

fn completion_body(prompt: &str, s: &Settings, stream: bool) -> Value {
    json!({
        "model": "anything", "prompt": prompt, "max_tokens": s.max_tokens,
        "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed, "stream": stream,
    })
}

/// The text of a streamed answer, checking the chunks' shape; returns (text, finish_reason).
fn streamed_text(response: &Response, chat: bool) -> (String, String) {
    assert_eq!(response.status, 200, "{:?}", response.body);
    assert!(
        response.head.contains("text/event-stream"),
        "{}",
        response.head
    );
    let events = response.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("JSON chunk"))
        .collect();
    let mut text = String::new();
    let mut finish = String::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let choice = &chunk["choices"][0];
        assert_eq!(choice["index"], 0);
        assert!(finish.is_empty(), "a chunk after the finish reason");
        if chat {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(choice["delta"]["role"].is_string(), i == 0);
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        } else {
            assert_eq!(chunk["object"], "text_completion");
            text.push_str(choice["text"].as_str().unwrap());
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.to_string();
        }
        assert_eq!(chunk["id"], chunks[0]["id"]);
    }
    (text, finish)
}

const GREEDY: Settings = Settings {
    max_tokens: 12,
    temperature: 0.0,
    top_p: 1.0,
    seed: 0,
    system: None,
};

#[test]
fn answers_equal_sun_generate() {
    let model = model_dir("serve_answers");
    let server = Server::start(&model, &[]);
    let models = server.get("/v1/models");
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], "model+ours");
    assert_eq!(models.json()["object"], "list");

    let cases = [
        ("What is the capital of France?", GREEDY),
        (
            "Write a short poem.",
            Settings {
                max_tokens: 20,
                temperature: 0.9,
                top_p: 0.8,
                seed: 42,
                system: None,
            },
        ),
        (
            "Give three tips.",
            Settings {
                max_tokens: 16,
                temperature: 1.3,
                top_p: 1.0,
                seed: 7,
                system: Some("You are terse."),
            },
        ),
    ];
    for (prompt, settings) in cases {
        let want = sun_generate(&model, prompt, true, &settings);
        assert!(!want.is_empty(), "{prompt}: empty reference answer");
        let whole = server.post_json("/v1/chat/completions", &chat_body(prompt, &settings, false));
        assert_eq!(whole.status, 200, "{:?}", whole.body);
        let answer = whole.json();
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
        assert_eq!(answer["choices"][0]["message"]["content"], want, "{prompt}");
        let usage = &answer["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["prompt_tokens"].as_u64().unwrap()
                    + usage["completion_tokens"].as_u64().unwrap()
            )
        );
        assert_eq!(answer["timings"]["predicted_n"], usage["completion_tokens"]);
        let finish = answer["choices"][0]["finish_reason"].as_str().unwrap();
        let length = usage["completion_tokens"].as_u64() == Some(settings.max_tokens as u64);
        assert_eq!(finish, if length { "length" } else { "stop" });

        let streamed =
            server.post_json("/v1/chat/completions", &chat_body(prompt, &settings, true));
        assert_eq!(
            streamed_text(&streamed, true),
            (want.clone(), finish.to_string())
        );

        // A stop sequence cuts the same answer where it first appears.
        let stop: String = want.chars().skip(3).take(2).collect();
        let mut body = chat_body(prompt, &settings, true);
        body["stop"] = json!([stop]);
        let (text, reason) = streamed_text(&server.post_json("/v1/chat/completions", &body), true);
        assert_eq!(text, want[..want.find(&stop).unwrap()]);
        assert_eq!(reason, "stop");

        let want = sun_generate(&model, prompt, false, &settings);
        let whole = server.post_json(
            "/v1/completions",
            &completion_body(prompt, &settings, false),
        );
        assert_eq!(whole.status, 200, "{:?}", whole.body);
        assert_eq!(whole.json()["object"], "text_completion");
        assert_eq!(whole.json()["choices"][0]["text"], want, "{prompt}");
        let streamed =
            server.post_json("/v1/completions", &completion_body(prompt, &settings, true));
        assert_eq!(streamed_text(&streamed, false).0, want);
    }

    // include_usage adds a last chunk with no choices and the counts.
    let mut body = chat_body("Hi", &GREEDY, true);
    body["stream_options"] = json!({"include_usage": true});
    let events = server.post_json("/v1/chat/completions", &body).events();
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(page.head.contains("text/html"));
    assert!(String::from_utf8_lossy(&page.body).contains("/v1/chat/completions"));
}

/// 200 malformed requests, each a 4xx with an OpenAI error object.
fn malformed_requests() -> Vec<(Vec<u8>, bool)> {
    let mut requests: Vec<(Vec<u8>, bool)> = Vec::new();
    // Garbage bytes from a fixed LCG, ended by closing the write side.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for i in 0..60 {
        let len = 1 + (i * 37) % 700;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        requests.push((bytes, true));
    }
    let heads = [
        "GET\r\n\r\n",
        "GET /\r\n\r\n",
        "GET / HTTP/1.1 x\r\n\r\n",
        "get / HTTP/1.1\r\n\r\n",
        "GET v1/models HTTP/1.1\r\n\r\n",
        "GET / HTTP/2.0\r\n\r\n",
        "GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        "GET / HTTP/1.1\r\n folded: header\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"prompt\":",
        "POST /v1/completions HTTP/1.1\r\nExpect: teapot\r\nContent-Length: 2\r\n\r\n{}",
        "GET /nowhere HTTP/1.1\r\n\r\n",
        "DELETE /v1/models HTTP/1.1\r\n\r\n",
        "GET /v1/chat/completions HTTP/1.1\r\n\r\n",
        "POST /v1/models HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "GET /v1/models HTTP/1.1\r\nHost: x",
    ];
    for head in heads {
        requests.push((head.as_bytes().to_vec(), true));
    }
    let long_header = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(20_000));
    requests.push((long_header.into_bytes(), false));
    let many_headers = format!("GET / HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(100));
    requests.push((many_headers.into_bytes(), false));
    // Bodies over the 1 MiB limit.
    for size in [(1 << 20) + 1, 3 << 19] {
        let mut raw =
            format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {size}\r\n\r\n")
                .into_bytes();
        raw.extend(std::iter::repeat(b' ').take(size));
        requests.push((raw, false));
    }
    let user = r#"[{"role":"user","content":"x"}]"#;
    let chat_bodies = [
        String::new(),
        "{".into(),
        "null".into(),
        "[]".into(),
        "\"text\"".into(),
        "{\"messages\":".into(),
        "{}".into(),
        r#"{"messages":null}"#.into(),
        r#"{"messages":[]}"#.into(),
        r#"{"messages":"hello"}"#.into(),
        r#"{"messages":[1,2]}"#.into(),
        r#"{"messages":[{"content":"x"}]}"#.into(),
        r#"{"messages":[{"role":"user"}]}"#.into(),
        r#"{"messages":[{"role":"robot","content":"x"}]}"#.into(),
        r#"{"messages":[{"role":"user","content":{"a":1}}]}"#.into(),
        r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#.into(),
        format!(r#"{{"messages":{user},"max_tokens":-1}}"#),
        format!(r#"{{"messages":{user},"max_tokens":0}}"#),
        format!(r#"{{"messages":{user},"max_tokens":100000}}"#),
        format!(r#"{{"messages":{user},"max_tokens":"5"}}"#),
        format!(r#"{{"messages":{user},"max_tokens":2.5}}"#),
        format!(r#"{{"messages":{user},"temperature":-0.5}}"#),
        format!(r#"{{"messages":{user},"temperature":"warm"}}"#),
        format!(r#"{{"messages":{user},"top_p":0}}"#),
        format!(r#"{{"messages":{user},"top_p":1.5}}"#),
        format!(r#"{{"messages":{user},"seed":-1}}"#),
        format!(r#"{{"messages":{user},"seed":"abc"}}"#),
        format!(r#"{{"messages":{user},"stream":1}}"#),
        format!(r#"{{"messages":{user},"stop":5}}"#),
        format!(r#"{{"messages":{user},"stop":[""]}}"#),
        format!(r#"{{"messages":{user},"stop":["a","b","c","d","e"]}}"#),
        format!(r#"{{"messages":{user},"n":3}}"#),
        format!(r#"{{"messages":{user},"model":["x"]}}"#),
        format!(r#"{{"messages":{user},"stream_options":true}}"#),
        format!(
            r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "long ".repeat(200)
        ),
        "\u{0}\u{1}\u{2}".into(),
    ];
    let completion_bodies = [
        "{}",
        r#"{"prompt":null}"#,
        r#"{"prompt":5}"#,
        r#"{"prompt":["a","b"]}"#,
        r#"{"prompt":[1,2,3]}"#,
        r#"{"prompt":"x","max_tokens":-3}"#,
        r#"{"prompt":"x","temperature":null,"top_p":-1}"#,
        r#"{"prompt":"x","echo":true}"#,
        r#"{"prompt":"x","logprobs":5}"#,
        r#"{"prompt":"x","frequency_penalty":1}"#,
        "not json at all",
    ];
    let post = |path: &str, body: &[u8]| {
        let mut raw = format!(
            "POST {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(body);
        raw
    };
    while requests.len() < 200 {
        for body in &chat_bodies {
            requests.push((post("/v1/chat/completions", body.as_bytes()), false));
        }
        for body in completion_bodies {
            requests.push((post("/v1/completions", body.as_bytes()), false));
        }
    }
    requests.truncate(200);
    requests
}

#[test]
fn malformed_requests_get_json_4xx_and_the_server_stays_up() {
    let model = model_dir("serve_malformed");
    let server = Server::start(&model, &[]);
    let requests = malformed_requests();
    assert_eq!(requests.len(), 200);
    let started = Instant::now();
    for (i, (raw, close_write)) in requests.iter().enumerate() {
        let response = server.exchange(raw, *close_write);
        let shown = String::from_utf8_lossy(&raw[..raw.len().min(120)]).into_owned();
        assert!(
            (400..500).contains(&response.status),
            "request {i} {shown:?}: status {} {:?}",
            response.status,
            String::from_utf8_lossy(&response.body)
        );
        let body = response.json();
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "request {i} {shown:?}: {body}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "malformed requests took {:?}",
        started.elapsed()
    );
    // Still up and still right.
    let want = sun_generate(&model, "Still there?", true, &GREEDY);
    let answer = server.post_json(
        "/v1/chat/completions",
        &chat_body("Still there?", &GREEDY, false),
    );
    assert_eq!(answer.json()["choices"][0]["message"]["content"], want);
}

#[test]
fn concurrent_requests_get_their_own_answers() {
    let model = model_dir("serve_concurrent");
    let server = Server::start(&model, &[]);
    let prompts: Vec<(String, Settings)> = (0..10)
        .map(|i| {
            (
                format!("Question number {i}: what do you know?"),
                Settings {
                    max_tokens: 6,
                    temperature: 0.8,
                    top_p: 0.95,
                    seed: 100 + i,
                    system: None,
                },
            )
        })
        .collect();
    let wants: Vec<String> = prompts
        .iter()
        .map(|(p, s)| sun_generate(&model, p, true, s))
        .collect();
    let distinct: std::collections::HashSet<&String> = wants.iter().collect();
    assert!(
        distinct.len() >= 5,
        "answers too alike to show mixing: {wants:?}"
    );
    let server = &server;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let (prompt, settings) = &prompts[i % 10];
                let body = chat_body(prompt, settings, i % 2 == 0);
                scope.spawn(move || {
                    let response = server.post_json("/v1/chat/completions", &body);
                    if i % 2 == 0 {
                        streamed_text(&response, true).0
                    } else {
                        assert_eq!(response.status, 200, "{:?}", response.body);
                        response.json()["choices"][0]["message"]["content"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    }
                })
            })
            .collect();
        for (i, handle) in handles.into_iter().enumerate() {
            assert_eq!(handle.join().unwrap(), wants[i % 10], "request {i}");
        }
    });
}

#[test]
fn slow_clients_time_out_extra_connections_get_503_and_leavers_free_the_worker() {
    let model = model_dir("serve_limits");
    let server = Server::start(&model, &["--max-connections", "2", "--read-timeout", "1"]);
    // Two silent clients take both places.
    let mut silent = [server.connect(), server.connect()];
    std::thread::sleep(Duration::from_millis(200));
    let busy = server.get("/v1/models");
    assert_eq!(busy.status, 503);
    assert!(busy.json()["error"]["message"].is_string());
    // Both time out with 408 after a second.
    for stream in &mut silent {
        let response = read_response(stream);
        assert_eq!(response.status, 408);
        assert!(response.json()["error"]["message"].is_string());
    }
    drop(silent);
    std::thread::sleep(Duration::from_millis(100));

    // A client reads the first piece of a long streamed answer and leaves.
    let settings = Settings {
        max_tokens: 100,
        ..GREEDY
    };
    let body = chat_body("Tell me a long story.", &settings, true).to_string();
    let mut leaver = server.connect();
    write!(
        leaver,
        "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let n = leaver.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(leaver);

    let want = sun_generate(&model, "And now?", true, &GREEDY);
    let answer = server.post_json(
        "/v1/chat/completions",
        &chat_body("And now?", &GREEDY, true),
    );
    assert_eq!(streamed_text(&answer, true).0, want);
    let log = server.log_text();
    assert!(log.contains(": 408 "), "{log}");
}

/// The page in headless Chromium: `?autotest=` sends messages as a user would (type, submit),
/// and the DOM after the answers holds the conversation.
#[test]
fn the_page_chats_in_headless_chromium() {
    let chromium = Path::new("/usr/bin/chromium");
    if !chromium.exists() {
        eprintln!("skipped: /usr/bin/chromium is not installed (apt-get install chromium)");
        return;
    }
    let model = model_dir("serve_page");
    let server = Server::start(&model, &[]);
    let settings = Settings {
        max_tokens: 10,
        temperature: 0.7,
        top_p: 0.9,
        seed: 0,
        system: Some("Be kind."),
    };
    let want = sun_generate(&model, "Hello there", true, &settings);
    let url = format!(
        "http://{}/?system=Be%20kind.&temperature=0.7&top_p=0.9&max_tokens=10\
         &autotest=Hello%20there&autotest=Tell%20me%20more",
        server.addr
    );
    let profile = scratch("serve_page_profile");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            // Virtual time runs ahead while the page waits on a streamed body, one timer tick
            // at a time (the page ticks every 10 ms while answering); a budget this large lasts
            // many real seconds, and the dump comes as soon as the page stops ticking.
            "--virtual-time-budget=1000000000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut dom = String::new();
        let _ = stdout.read_to_string(&mut dom);
        let _ = tx.send(dom);
    });
    let dom = rx.recv_timeout(Duration::from_secs(90));
    let _ = child.kill();
    let _ = child.wait();
    let dom = dom.expect("chromium printed the DOM within 90 s");
    let start = dom
        .find("<pre id=\"autotest-result\" hidden=\"\">")
        .unwrap_or_else(|| panic!("no #autotest-result in the DOM:\n{dom}"));
    let rest = &dom[start..];
    let inner = &rest[rest.find('>').unwrap() + 1..rest.find("</pre>").unwrap()];
    let json = inner
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&");
    let result: Value = serde_json::from_str(&json).expect("autotest JSON");
    let history = result["history"].as_array().unwrap();
    assert_eq!(history.len(), 4, "{result}");
    assert_eq!(
        history[0],
        json!({"role": "user", "content": "Hello there"})
    );
    assert_eq!(history[1]["role"], "assistant");
    assert_eq!(history[1]["content"], want);
    assert_eq!(history[2]["content"], "Tell me more");
    assert!(!history[3]["content"].as_str().unwrap().is_empty());
    // The streamed answers are on the page itself, not only in the result.
    assert!(dom.contains("class=\"msg assistant\""));
    assert!(result["stats"]["tokens"].as_u64().unwrap() > 0);
}

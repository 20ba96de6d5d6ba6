//! `sun serve`: an OpenAI-compatible HTTP API and a chat page for one model (and adapter).
//!
//! The shape: the accepting thread hands each connection to a thread of its own, at most
//! `max_connections` at a time (beyond that the client gets a quick 503). A connection thread
//! reads one request within a deadline ([`http`]), checks it ([`openai`]), tokenizes the
//! prompt, and queues a job for the one generation worker ([`worker`]), which owns the model
//! (on the CPU, or on the GPU it opened on its own thread) and serves jobs in order. The job's text comes back over the job's own channel and goes out
//! as one JSON answer or as server-sent events. When the client goes away (a failed write, or
//! the socket found closed while waiting) the job is cancelled and the worker stops it at the
//! next token, or skips it if it has not started.
//!
//! Answers equal `sun generate`'s for the same prompt and settings: the same chat rendering,
//! tokenization, sampler and seed, and a fresh KV cache per request.

mod http;
mod openai;
mod stop;
mod worker;

use crate::chat::ChatFormat;
use crate::device::{DeviceChoice, GpuChoice};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use http::{HttpError, Request, RequestLimits};
use openai::{Answer, Endpoint, GenerationLimits, GenerationRequest, Prompt};
use serde_json::Value;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use worker::{Event, Job};

/// The chat page, served at `/`.
const PAGE: &str = include_str!("page.html");

/// How long a write to a client may block before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a connection waiting for its answer checks that its client is still there.
const CLIENT_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// How long, and how many bytes, a closing connection drains from its client.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Limits that keep the server up under load and bad input.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Open connections at most; more are answered 503 at once.
    pub max_connections: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// Time a client has to send its whole request.
    pub read_timeout: Duration,
}

/// What is served: the model with its tokenizer and chat format.
pub struct ServedModel {
    /// The model, adapter attached.
    pub model: Llama,
    /// Where it runs: resolved on the generation worker's thread, which then owns the GPU.
    pub device: DeviceChoice,
    /// The GPUs (`--devices`, `--device-map`) when it runs on GPUs.
    pub gpus: GpuChoice,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// How chat messages are rendered.
    pub format: ChatFormat,
    /// Positions in the KV cache: prompt and answer together must fit.
    pub context_len: usize,
    /// The name `/v1/models` lists and answers carry.
    pub name: String,
}

/// A bound listening socket, ready to serve.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    limits: ServeLimits,
    quiet: bool,
}

/// What the connection threads share.
struct Shared {
    tokenizer: Arc<Tokenizer>,
    format: ChatFormat,
    context_len: usize,
    name: String,
    /// Unix seconds at start.
    created: u64,
    limits: ServeLimits,
    quiet: bool,
    jobs: Sender<Job>,
    next_request: AtomicU64,
    open_connections: AtomicUsize,
}

/// One of the `max_connections` places; dropping it frees the place.
struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Server {
    /// Binds `host:port` (port 0 picks a free port).
    pub fn bind(host: &str, port: u16, limits: ServeLimits, quiet: bool) -> Result<Server> {
        if limits.max_connections == 0 || limits.max_tokens == 0 || limits.read_timeout.is_zero() {
            return Err(Error::invalid(
                "--max-connections, --max-tokens and --read-timeout must be at least 1",
            ));
        }
        let listener =
            TcpListener::bind((host, port)).map_err(|e| Error::io(format!("{host}:{port}"), e))?;
        Ok(Server {
            listener,
            limits,
            quiet,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("<listening socket>", e))
    }

    /// Starts the generation worker, which puts the model on its device; once it is ready,
    /// calls `on_ready` and serves `served` until the process ends. Fails, before `on_ready`,
    /// when the device cannot be opened or the model cannot be put on it.
    pub fn run(self, served: ServedModel, on_ready: impl FnOnce()) -> Result<()> {
        let tokenizer = Arc::new(served.tokenizer);
        let (jobs, queue) = mpsc::channel();
        let (ready, readiness) = mpsc::channel();
        let worker_tokenizer = Arc::clone(&tokenizer);
        let (context_len, quiet) = (served.context_len, self.quiet);
        let (model, device, gpus) = (served.model, served.device, served.gpus);
        std::thread::Builder::new()
            .name("sun-generate".into())
            .spawn(move || {
                worker::run_worker(
                    model,
                    (device, gpus),
                    worker_tokenizer,
                    context_len,
                    queue,
                    ready,
                    quiet,
                )
            })
            .map_err(|e| Error::io("<generation thread>", e))?;
        readiness.recv().map_err(|_| {
            Error::Device("the generation worker stopped while loading the model".into())
        })??;
        on_ready();
        let shared = Arc::new(Shared {
            tokenizer,
            format: served.format,
            context_len,
            name: served.name,
            created: unix_seconds(),
            limits: self.limits,
            quiet,
            jobs,
            next_request: AtomicU64::new(1),
            open_connections: AtomicUsize::new(0),
        });
        for connection in self.listener.incoming() {
            let stream = match connection {
                Ok(stream) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: let it pass rather than spin.
                    eprintln!("sun serve: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let open = shared.open_connections.fetch_add(1, Ordering::SeqCst);
            let slot = ConnectionSlot(Arc::clone(&shared));
            if open >= shared.limits.max_connections {
                drop(slot);
                refuse_busy(&stream);
                continue;
            }
            let spawned = std::thread::Builder::new()
                .name("sun-connection".into())
                .spawn(move || handle_connection(&stream, &slot.0));
            if let Err(e) = spawned {
                eprintln!("sun serve: cannot start a connection thread: {e}");
            }
        }
        Ok(())
    }
}

/// Seconds since the Unix epoch.
fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Answers 503 to a connection beyond the limit, without blocking the accepting thread long.
fn refuse_busy(stream: &TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    // Take in what already arrived, so that closing does not reset the connection.
    if stream.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 16 * 1024];
        let _ = std::io::Read::read(&mut &*stream, &mut buf);
        let _ = stream.set_nonblocking(false);
    }
    let error = HttpError::new(
        503,
        "the server is at its connection limit; try again shortly",
    );
    let _ = write_error(stream, &error);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Serves one connection: one request, one answer, then close.
fn handle_connection(stream: &TcpStream, shared: &Shared) {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let started = Instant::now();
    let limits = RequestLimits {
        max_head_bytes: 16 * 1024,
        max_body_bytes: shared.limits.max_body_bytes,
        read_timeout: shared.limits.read_timeout,
    };
    let (what, outcome) = match http::read_request(stream, &limits) {
        Ok(request) => (
            format!("{} {}", request.method, request.path),
            route(stream, &request, shared),
        ),
        Err(error) => ("(unreadable request)".to_string(), Err(error)),
    };
    let (status, problem) = match outcome {
        Ok(status) => (status, String::new()),
        Err(error) => {
            let _ = write_error(stream, &error);
            (error.status, format!(": {}", error.message))
        }
    };
    if !shared.quiet {
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("{what}: {status} in {seconds:.2}s{problem}");
    }
    http::linger_close(stream, 2 * shared.limits.max_body_bytes, LINGER_TIME);
}

/// Sends an OpenAI error object.
fn write_error(stream: &TcpStream, error: &HttpError) -> std::io::Result<()> {
    let body = openai::error_body(error.status, &error.message).to_string();
    http::write_response(
        stream,
        error.status,
        "application/json",
        &[],
        body.as_bytes(),
    )
}

/// Sends a JSON answer with status 200.
fn write_json(stream: &TcpStream, value: &Value) -> std::io::Result<()> {
    http::write_response(
        stream,
        200,
        "application/json",
        &[],
        value.to_string().as_bytes(),
    )
}

/// Dispatches a request; returns the status sent (499 when the client left first).
fn route(stream: &TcpStream, request: &Request, shared: &Shared) -> Result<u16, HttpError> {
    let written = |result: std::io::Result<()>| Ok(if result.is_ok() { 200 } else { 499 });
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/") => written(http::write_response(
            stream,
            200,
            "text/html; charset=utf-8",
            &[(
                "Content-Security-Policy",
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            )],
            PAGE.as_bytes(),
        )),
        ("GET", "/v1/models") => written(write_json(
            stream,
            &openai::model_list(&shared.name, shared.created),
        )),
        ("POST", "/v1/chat/completions") => {
            serve_generation(stream, Endpoint::Chat, &request.body, shared)
        }
        ("POST", "/v1/completions") => {
            serve_generation(stream, Endpoint::Completion, &request.body, shared)
        }
        (_, "/" | "/v1/models" | "/v1/chat/completions" | "/v1/completions") => Err(
            HttpError::new(405, format!("{} is not allowed here", request.method)),
        ),
        (_, path) => Err(HttpError::new(404, format!("no such endpoint: {path}"))),
    }
}

/// Checks, tokenizes and queues a generation request, then sends its answer.
fn serve_generation(
    stream: &TcpStream,
    endpoint: Endpoint,
    body: &[u8],
    shared: &Shared,
) -> Result<u16, HttpError> {
    let limits = GenerationLimits {
        max_tokens: shared.limits.max_tokens,
    };
    let request = match endpoint {
        Endpoint::Chat => openai::parse_chat_request(body, &limits)?,
        Endpoint::Completion => openai::parse_completion_request(body, &limits)?,
    };
    let prompt = tokenize_prompt(&request, shared)?;
    let number = shared.next_request.fetch_add(1, Ordering::Relaxed);
    let answer = Answer::new(endpoint, number, unix_seconds(), &shared.name, prompt.len());
    let (events, replies) = mpsc::channel();
    let cancelled = Arc::new(AtomicBool::new(false));
    let job = Job {
        id: number,
        prompt,
        max_tokens: request.max_tokens,
        params: request.params,
        stops: request.stops.clone(),
        events,
        cancelled: Arc::clone(&cancelled),
    };
    shared
        .jobs
        .send(job)
        .map_err(|_| HttpError::new(500, "the generation worker has stopped"))?;
    let mut waiter = Waiter {
        replies,
        stream,
        cancelled,
        last_check: Instant::now(),
    };
    if request.stream {
        stream_answer(&mut waiter, &answer, request.include_usage)
    } else {
        whole_answer(&mut waiter, &answer)
    }
}

/// The prompt's token ids, as `sun generate` makes them: a chat rendered by the template and
/// encoded without added special tokens, plain text encoded with them (BOS).
fn tokenize_prompt(request: &GenerationRequest, shared: &Shared) -> Result<Vec<u32>, HttpError> {
    let ids = match &request.prompt {
        Prompt::Chat(messages) => {
            let text = shared
                .format
                .render_text(messages, true)
                .map_err(|e| HttpError::new(400, e.to_string()))?;
            shared.tokenizer.encode(&text, false)
        }
        Prompt::Text(text) => shared.tokenizer.encode(text, true),
    };
    if ids.is_empty() {
        return Err(HttpError::new(400, "the prompt is empty"));
    }
    if ids.len() > shared.context_len {
        return Err(HttpError::new(
            400,
            format!(
                "the prompt has {} tokens but the context holds {}; shorten it",
                ids.len(),
                shared.context_len
            ),
        ));
    }
    Ok(ids)
}

/// What waiting for the worker can bring.
enum Wait {
    Event(Event),
    ClientGone,
    WorkerGone,
}

/// A connection waiting for its job's events, watching its client meanwhile.
struct Waiter<'a> {
    replies: Receiver<Event>,
    stream: &'a TcpStream,
    cancelled: Arc<AtomicBool>,
    last_check: Instant,
}

impl Waiter<'_> {
    /// The next event, unless the client leaves (then the job is cancelled) or the worker died.
    fn next(&mut self) -> Wait {
        loop {
            if self.last_check.elapsed() >= CLIENT_CHECK_INTERVAL {
                self.last_check = Instant::now();
                if http::peer_closed(self.stream) {
                    self.cancel();
                    return Wait::ClientGone;
                }
            }
            match self.replies.recv_timeout(CLIENT_CHECK_INTERVAL) {
                Ok(event) => return Wait::Event(event),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Wait::WorkerGone,
            }
        }
    }

    /// Tells the worker to drop the job.
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

/// The status for a worker that stopped without finishing the job.
fn worker_gone() -> HttpError {
    HttpError::new(
        500,
        "the generation worker stopped before finishing the answer",
    )
}

/// Collects the whole answer, then sends it as one JSON object.
fn whole_answer(waiter: &mut Waiter, answer: &Answer) -> Result<u16, HttpError> {
    let mut text = String::new();
    loop {
        match waiter.next() {
            Wait::Event(Event::Text(piece)) => text.push_str(&piece),
            Wait::Event(Event::Done(outcome)) => {
                let sent = write_json(waiter.stream, &answer.complete(&text, &outcome));
                return Ok(if sent.is_ok() { 200 } else { 499 });
            }
            Wait::Event(Event::Failed(message)) => return Err(HttpError::new(500, message)),
            Wait::ClientGone => return Ok(499),
            Wait::WorkerGone => return Err(worker_gone()),
        }
    }
}

/// Sends the answer as server-sent events: a first chunk (the role, for chat), one chunk per
/// piece of text, a last chunk with the finish reason, the usage chunk if asked, `[DONE]`.
fn stream_answer(
    waiter: &mut Waiter,
    answer: &Answer,
    include_usage: bool,
) -> Result<u16, HttpError> {
    let stream = waiter.stream;
    let send = |value: Value| http::write_event(stream, &value.to_string());
    let mut first = true;
    let mut sent = http::write_event_stream_head(stream);
    if answer.endpoint == Endpoint::Chat && sent.is_ok() {
        sent = send(answer.chunk(true, "", None, include_usage));
        first = false;
    }
    while sent.is_ok() {
        match waiter.next() {
            Wait::Event(Event::Text(piece)) => {
                sent = send(answer.chunk(first, &piece, None, include_usage));
                first = false;
            }
            Wait::Event(Event::Done(outcome)) => {
                sent = send(answer.last_chunk(first, &outcome, include_usage));
                if include_usage && sent.is_ok() {
                    sent = send(answer.usage_chunk(&outcome));
                }
                if sent.is_ok() {
                    sent = http::write_event(stream, "[DONE]");
                }
                break;
            }
            Wait::Event(Event::Failed(message)) => {
                // The head is out already: the error travels as an event, as OpenAI's do.
                let _ = send(openai::error_body(500, &message));
                return Ok(500);
            }
            Wait::ClientGone => return Ok(499),
            Wait::WorkerGone => {
                let _ = send(openai::error_body(500, &worker_gone().message));
                return Ok(500);
            }
        }
    }
    if sent.is_err() {
        waiter.cancel();
        return Ok(499);
    }
    Ok(200)
}

//! The generation worker: one thread owns the model and one KV cache and serves jobs in the
//! order they arrive (on a CPU, generating two answers at once would only slow both). Each job
//! gets its text back over its own channel, so answers never mix; a job whose client has gone
//! is skipped or stopped at the next token.

use crate::error::Error;
use crate::model::{KvCache, Llama};
use crate::sampling::{generate, Sampler, SamplingParams, StopReason};
use crate::serve::stop::StopMatcher;
use crate::tokenizer::{DecodeStream, Tokenizer};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

/// One generation request, ready to run.
#[derive(Debug)]
pub(crate) struct Job {
    /// A number for the log.
    pub(crate) id: u64,
    /// The prompt's token ids (non-empty, fits the context).
    pub(crate) prompt: Vec<u32>,
    /// Most new tokens.
    pub(crate) max_tokens: usize,
    /// Sampling settings, seed included.
    pub(crate) params: SamplingParams,
    /// Stop sequences.
    pub(crate) stops: Vec<String>,
    /// Where the text goes.
    pub(crate) events: Sender<Event>,
    /// Set by the connection when its client has gone.
    pub(crate) cancelled: Arc<AtomicBool>,
}

/// Why an answer ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// End of sequence or a stop sequence.
    Stop,
    /// `max_tokens` or the context ran out.
    Length,
}

impl Finish {
    /// `"stop"` or `"length"`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a job sends back, in order: any number of `Text`, then one `Done` or `Failed`.
#[derive(Debug, PartialEq)]
pub(crate) enum Event {
    /// The next piece of the answer (never empty).
    Text(String),
    /// The answer is complete.
    Done {
        /// New tokens generated (the end-of-sequence token not counted).
        completion_tokens: usize,
        /// Why it ended.
        finish: Finish,
    },
    /// Generation failed; the message says why.
    Failed(String),
}

/// How a job's token callback ended generation early.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Interrupted {
    No,
    StopSequence,
    ClientGone,
}

/// Serves `jobs` until every sender is gone. `ctx` is the KV cache's length.
pub(crate) fn run_worker(
    model: Llama,
    tokenizer: Arc<Tokenizer>,
    ctx: usize,
    jobs: Receiver<Job>,
    quiet: bool,
) {
    let mut cache = model.new_cache(ctx);
    let eos_ids = tokenizer.eos_ids();
    for job in jobs {
        if job.cancelled.load(Ordering::Relaxed) {
            if !quiet {
                eprintln!("request {}: client gone before its turn; skipped", job.id);
            }
            continue;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            run_job(&model, &tokenizer, &eos_ids, &mut cache, &job)
        }));
        match outcome {
            Ok(Some(tokens)) if !quiet => eprintln!(
                "request {}: client gone after {tokens} new tokens; generation stopped",
                job.id
            ),
            Ok(_) => {}
            Err(_) => {
                let _ = job.events.send(Event::Failed(
                    "internal error in generation (see the server log)".into(),
                ));
            }
        }
    }
}

/// Runs one job to its end, sending its events. Returns the tokens generated when the client
/// went away before the end.
fn run_job(
    model: &Llama,
    tokenizer: &Tokenizer,
    eos_ids: &[u32],
    cache: &mut KvCache,
    job: &Job,
) -> Option<usize> {
    cache.clear();
    let mut sampler = match Sampler::new(job.params) {
        Ok(s) => s,
        Err(e) => {
            let _ = job.events.send(Event::Failed(e.to_string()));
            return None;
        }
    };
    let mut decoder = DecodeStream::new(tokenizer, true);
    let mut stops = StopMatcher::new(job.stops.clone());
    let mut produced = 0usize;
    let mut interrupted = Interrupted::No;
    let result = generate(
        model,
        cache,
        &job.prompt,
        job.max_tokens,
        eos_ids,
        &mut sampler,
        |id| {
            produced += 1;
            let (text, hit) = stops.push(&decoder.push(id));
            let gone = job.cancelled.load(Ordering::Relaxed)
                || (!text.is_empty() && job.events.send(Event::Text(text)).is_err());
            interrupted = if gone {
                Interrupted::ClientGone
            } else if hit {
                Interrupted::StopSequence
            } else {
                return Ok(());
            };
            Err(Error::invalid("generation interrupted"))
        },
    );
    let finish = match (result, interrupted) {
        (_, Interrupted::ClientGone) => return Some(produced),
        (_, Interrupted::StopSequence) => Finish::Stop,
        (Ok(generation), Interrupted::No) => {
            let rest = stops.finish();
            if !rest.is_empty() && job.events.send(Event::Text(rest)).is_err() {
                return Some(produced);
            }
            match generation.stop {
                StopReason::Eos(_) => Finish::Stop,
                StopReason::MaxNewTokens | StopReason::ContextFull => Finish::Length,
            }
        }
        (Err(e), Interrupted::No) => {
            let _ = job.events.send(Event::Failed(e.to_string()));
            return None;
        }
    };
    let done = Event::Done {
        completion_tokens: produced,
        finish,
    };
    job.events.send(done).err().map(|_| produced)
}

//! The generation worker: one thread owns the model and one KV cache and serves jobs in the
//! order they arrive (on a CPU, generating two answers at once would only slow both). On a GPU
//! the worker's thread is also the one that initialises the device and uploads the model, so
//! every driver call happens on the thread whose context is current. Each job gets its text
//! back over its own channel, so answers never mix; a job whose client has gone is skipped or
//! stopped at the next token.

use crate::device::{ComputeDevice, DeviceChoice, GpuChoice};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::sampling::{
    generate_with, CachedDecoder, CpuDecoder, Sampler, SamplingParams, StopReason,
};
use crate::serve::stop::StopMatcher;
use crate::tokenizer::{DecodeStream, Tokenizer};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// How an answer ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Outcome {
    /// New tokens generated (the end-of-sequence token not counted).
    pub(crate) completion_tokens: usize,
    /// Why it ended.
    pub(crate) finish: Finish,
    /// From the job's start to the first new token: the prompt's prefill.
    pub(crate) prefill: Duration,
    /// From the first new token to the last.
    pub(crate) decode: Duration,
}

/// What a job sends back, in order: any number of `Text`, then one `Done` or `Failed`.
#[derive(Debug, PartialEq)]
pub(crate) enum Event {
    /// The next piece of the answer (never empty).
    Text(String),
    /// The answer is complete.
    Done(Outcome),
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

/// Puts `model` on the device `choice` resolves to (on this thread), with a KV cache of `ctx`
/// positions, reports on `ready` that it is serving (or why it cannot), then serves `jobs`
/// until every sender is gone.
pub(crate) fn run_worker(
    model: Llama,
    (choice, gpus): (DeviceChoice, GpuChoice),
    tokenizer: Arc<Tokenizer>,
    ctx: usize,
    jobs: Receiver<Job>,
    ready: Sender<Result<()>>,
    quiet: bool,
) {
    let device = match crate::device::resolve_gpus(choice, &gpus) {
        Ok(device) => device,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if !quiet && !matches!(device, ComputeDevice::Cpu) {
        eprintln!("device: {}", device.describe());
    }
    match &device {
        ComputeDevice::Cpu => {
            let mut cache = model.new_cache(ctx);
            let mut decoder = CpuDecoder {
                model: &model,
                cache: &mut cache,
            };
            let _ = ready.send(Ok(()));
            serve_jobs(&mut decoder, &tokenizer, jobs, quiet);
        }
        #[cfg(feature = "cuda")]
        ComputeDevice::Cuda(gpu) => {
            let mut gpu_model = match gpu.model(model) {
                Ok(gpu_model) => gpu_model,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            match crate::model::gpu::GpuDecoder::for_generation(&mut gpu_model, ctx) {
                Ok(mut decoder) => {
                    let _ = ready.send(Ok(()));
                    serve_jobs(&mut decoder, &tokenizer, jobs, quiet);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            }
        }
    }
}

/// Serves `jobs` on `decoder`, in order, until every sender is gone.
fn serve_jobs(
    decoder: &mut dyn CachedDecoder,
    tokenizer: &Tokenizer,
    jobs: Receiver<Job>,
    quiet: bool,
) {
    let eos_ids = tokenizer.eos_ids();
    for job in jobs {
        if job.cancelled.load(Ordering::Relaxed) {
            if !quiet {
                eprintln!("request {}: client gone before its turn; skipped", job.id);
            }
            continue;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            run_job(&mut *decoder, tokenizer, &eos_ids, &job)
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
    decoder: &mut dyn CachedDecoder,
    tokenizer: &Tokenizer,
    eos_ids: &[u32],
    job: &Job,
) -> Option<usize> {
    decoder.clear();
    let mut sampler = match Sampler::new(job.params) {
        Ok(s) => s,
        Err(e) => {
            let _ = job.events.send(Event::Failed(e.to_string()));
            return None;
        }
    };
    let mut detokenizer = DecodeStream::new(tokenizer, true);
    let mut stops = StopMatcher::new(job.stops.clone());
    let mut produced = 0usize;
    let mut interrupted = Interrupted::No;
    let started = Instant::now();
    let mut first_token_at = None;
    let result = generate_with(
        decoder,
        &job.prompt,
        job.max_tokens,
        eos_ids,
        &mut sampler,
        |id| {
            first_token_at.get_or_insert_with(Instant::now);
            produced += 1;
            let (text, hit) = stops.push(&detokenizer.push(id));
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
    let first_token_at = first_token_at.unwrap_or_else(Instant::now);
    let done = Event::Done(Outcome {
        completion_tokens: produced,
        finish,
        prefill: first_token_at.duration_since(started),
        decode: first_token_at.elapsed(),
    });
    job.events.send(done).err().map(|_| produced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{KvCache, LlamaConfig};
    use crate::sampling::generate;
    use std::sync::mpsc;

    /// A random two-layer model over the 256-token byte-level tokenizer of the fixtures.
    fn tiny() -> (Llama, Arc<Tokenizer>) {
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
            "bos_token_id": 1, "eos_token_id": 2
        });
        let config = LlamaConfig::from_json(&config, "test config").unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/lora_grad/tokenizer.json");
        (
            Llama::random(config, false, 3).unwrap(),
            Arc::new(Tokenizer::from_file(&path).unwrap()),
        )
    }

    const PARAMS: SamplingParams = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 11,
    };

    fn job(id: u64, prompt: &[u32], stops: &[&str]) -> (Job, mpsc::Receiver<Event>) {
        let (events, replies) = mpsc::channel();
        let job = Job {
            id,
            prompt: prompt.to_vec(),
            max_tokens: 20,
            params: PARAMS,
            stops: stops.iter().map(|s| s.to_string()).collect(),
            events,
            cancelled: Arc::new(AtomicBool::new(false)),
        };
        (job, replies)
    }

    /// The text and the last event of a finished job.
    fn collect(replies: &mpsc::Receiver<Event>) -> (String, Option<Event>) {
        let mut text = String::new();
        for event in replies.iter() {
            match event {
                Event::Text(piece) => text.push_str(&piece),
                last => return (text, Some(last)),
            }
        }
        (text, None)
    }

    #[test]
    fn jobs_run_in_order_alone_and_match_the_generation_loop() {
        let (model, tok) = tiny();
        let prompt = [1u32, 72, 105, 33];
        // The reference: the generation loop itself, text decoded after the fact.
        let mut cache = model.new_cache(64);
        let mut sampler = Sampler::new(PARAMS).unwrap();
        let want = generate(
            &model,
            &mut cache,
            &prompt,
            20,
            &tok.eos_ids(),
            &mut sampler,
            |_| Ok(()),
        )
        .unwrap();
        let want_text = tok.decode(&want.tokens, true);
        assert!(want_text.chars().count() > 4, "{want_text:?}");
        let stop: String = want_text.chars().skip(2).take(2).collect();
        let before_stop = &want_text[..want_text.find(&stop).unwrap()];

        let (first, first_replies) = job(1, &prompt, &[]);
        let (skipped, skipped_replies) = job(2, &prompt, &[]);
        skipped.cancelled.store(true, Ordering::Relaxed);
        let (again, again_replies) = job(3, &prompt, &[]);
        let (stopped, stopped_replies) = job(4, &prompt, &[&stop]);
        let (jobs, queue) = mpsc::channel();
        for j in [first, skipped, again, stopped] {
            jobs.send(j).unwrap();
        }
        drop(jobs);
        let (ready, readiness) = mpsc::channel();
        run_worker(
            model,
            (DeviceChoice::Cpu, GpuChoice::default()),
            Arc::clone(&tok),
            64,
            queue,
            ready,
            true,
        );
        assert!(matches!(readiness.recv(), Ok(Ok(()))));

        let finish = if want.tokens.len() == 20 {
            Finish::Length
        } else {
            Finish::Stop
        };
        let (text, last) = collect(&first_replies);
        assert_eq!(text, want_text);
        let Some(Event::Done(outcome)) = last else {
            panic!("{last:?}")
        };
        assert_eq!(
            (outcome.completion_tokens, outcome.finish),
            (want.tokens.len(), finish)
        );
        assert_eq!(collect(&skipped_replies), (String::new(), None));
        let (text, last) = collect(&again_replies);
        assert_eq!(text, want_text, "a fresh cache per job");
        assert!(matches!(last, Some(Event::Done(_))));
        let (text, last) = collect(&stopped_replies);
        assert_eq!(text, before_stop);
        assert!(matches!(last, Some(Event::Done(o)) if o.finish == Finish::Stop));
    }

    #[test]
    fn a_cancelled_or_abandoned_job_stops_at_the_next_token() {
        let (model, tok) = tiny();
        let mut cache: KvCache = model.new_cache(64);
        let mut decoder = CpuDecoder {
            model: &model,
            cache: &mut cache,
        };
        let eos = tok.eos_ids();
        let (cancelled, _replies) = job(1, &[1, 72], &[]);
        cancelled.cancelled.store(true, Ordering::Relaxed);
        assert_eq!(run_job(&mut decoder, &tok, &eos, &cancelled), Some(1));
        let (abandoned, replies) = job(2, &[1, 72], &[]);
        drop(replies);
        let produced = run_job(&mut decoder, &tok, &eos, &abandoned);
        assert!(matches!(produced, Some(n) if n < 20), "{produced:?}");
    }

    /// `--device cuda` for the tiny model fails everywhere: no GPU here, and its head_dim (8)
    /// is not one the GPU kernels support where there is one. The worker says so on `ready`
    /// and stops, so queued jobs are refused.
    #[test]
    fn a_device_that_cannot_serve_is_reported_and_the_worker_stops() {
        let (model, tok) = tiny();
        let (jobs, queue) = mpsc::channel();
        let (ready, readiness) = mpsc::channel();
        let cuda = (DeviceChoice::Cuda, GpuChoice::default());
        run_worker(model, cuda, tok, 64, queue, ready, true);
        let reported = readiness
            .recv()
            .expect("the worker reports before it stops");
        assert!(reported.is_err());
        let (late, _replies) = job(1, &[1, 72], &[]);
        assert!(jobs.send(late).is_err(), "the worker has stopped");
    }
}

//! A local BERT sentence embedder on candle (CPU), run on a thread of its own.

use std::fmt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, DTYPE};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::embed::{normalize, EmbedError, EmbedFuture, Embedder};

/// The most texts the model thread runs in one forward pass. Requests that queue up while it
/// is busy are embedded together, up to this many.
const MAX_BATCH: usize = 32;

/// How a sentence-transformers model turns token vectors into one sentence vector
/// (`1_Pooling/config.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pooling {
    /// The mean of the token vectors (all-MiniLM-L6-v2).
    Mean,
    /// The vector of the `[CLS]` token (bge-small-en-v1.5).
    Cls,
}

/// A sentence-transformers BERT model loaded from a directory, run on CPU on a dedicated
/// thread, so the async threads never wait on it.
///
/// The directory holds `model.safetensors`, `tokenizer.json`, `config.json` and
/// `1_Pooling/config.json` (mean pooling for all-MiniLM-L6-v2, `[CLS]` for
/// bge-small-en-v1.5); `sentence_bert_config.json`, when present, gives the longest input.
/// Texts longer than that are refused rather than truncated: a truncated question would
/// match one that differs only past the cut.
///
/// ```no_run
/// # fn main() -> Result<(), cachecore::semantic::EmbedError> {
/// let embedder = cachecore::semantic::LocalEmbedder::load("models/bge-small-en-v1.5")?;
/// # Ok(()) }
/// ```
pub struct LocalEmbedder {
    id: Arc<str>,
    dims: usize,
    jobs: mpsc::Sender<Job>,
}

impl fmt::Debug for LocalEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalEmbedder")
            .field("id", &self.id)
            .field("dims", &self.dims)
            .finish_non_exhaustive()
    }
}

struct Job {
    texts: Vec<String>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>, EmbedError>>,
}

struct Model {
    bert: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    max_tokens: usize,
    device: Device,
}

fn fail(context: &str, e: impl fmt::Display) -> EmbedError {
    EmbedError::new(format!("{context}: {e}"))
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, EmbedError> {
    std::fs::read(dir.join(name)).map_err(|e| {
        EmbedError::new(format!(
            "{}: {e} (a sentence-transformers model directory is expected)",
            dir.join(name).display()
        ))
    })
}

impl LocalEmbedder {
    /// Loads the model in `dir` and starts its thread.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, EmbedError> {
        let dir = dir.as_ref();
        let config_json = read(dir, "config.json")?;
        let pooling_json = read(dir, "1_Pooling/config.json")?;
        let tokenizer_json = read(dir, "tokenizer.json")?;
        let weights = read(dir, "model.safetensors")?;

        let config: Config =
            serde_json::from_slice(&config_json).map_err(|e| fail("config.json", e))?;
        let pooling = pooling_of(&pooling_json)?;
        let max_tokens = std::fs::read(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("max_seq_length")?.as_u64())
            .map_or(config.max_position_embeddings, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            })
            .min(config.max_position_embeddings);

        let mut tokenizer =
            Tokenizer::from_bytes(&tokenizer_json).map_err(|e| fail("tokenizer.json", e))?;
        // The file may ask for truncation and fixed padding; this embedder pads each batch to
        // its longest text and refuses what does not fit.
        tokenizer
            .with_truncation(None)
            .map_err(|e| fail("tokenizer.json", e))?;
        tokenizer.with_padding(None);

        let device = Device::Cpu;
        let tensors = candle_core::safetensors::load_buffer(&weights, &device)
            .map_err(|e| fail("model.safetensors", e))?;
        let vb = VarBuilder::from_tensors(tensors, DTYPE, &device);
        let bert = BertModel::load(vb, &config).map_err(|e| fail("loading BERT", e))?;

        // The identity covers everything that shapes the vectors.
        let mut h = Sha256::new();
        for part in [&config_json, &pooling_json, &tokenizer_json, &weights] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let digest: [u8; 32] = h.finalize().into();
        let name = dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy());
        let id: Arc<str> = format!("local:{name}:{}", crate::key::to_hex(&digest[..8])).into();
        drop(weights);

        let model = Model {
            bert,
            tokenizer,
            pooling,
            max_tokens,
            device,
        };
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("cachecore-embed".into())
            .spawn(move || run(&model, &rx))
            .map_err(|e| EmbedError::new(format!("starting the model thread: {e}")))?;
        Ok(Self {
            id,
            dims: config.hidden_size,
            jobs,
        })
    }

    /// The length of the vectors.
    pub fn dims(&self) -> usize {
        self.dims
    }
}

fn pooling_of(json: &[u8]) -> Result<Pooling, EmbedError> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| fail("1_Pooling/config.json", e))?;
    let on = |k: &str| v.get(k).and_then(serde_json::Value::as_bool) == Some(true);
    match (on("pooling_mode_mean_tokens"), on("pooling_mode_cls_token")) {
        (true, false) => Ok(Pooling::Mean),
        (false, true) => Ok(Pooling::Cls),
        _ => Err(EmbedError::new(
            "1_Pooling/config.json: exactly one of mean or CLS pooling is supported",
        )),
    }
}

impl Embedder for LocalEmbedder {
    fn id(&self) -> &str {
        &self.id
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> EmbedFuture<'a> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let sent = self.jobs.send(Job {
            texts: texts.to_vec(),
            reply,
        });
        Box::pin(async move {
            sent.map_err(|_| EmbedError::new("the model thread has stopped"))?;
            rx.await
                .map_err(|_| EmbedError::new("the model thread has stopped"))?
        })
    }
}

/// The model thread: takes a job, and every job queued behind it up to [`MAX_BATCH`] texts,
/// and runs them as one batch. Ends when the embedder is dropped.
fn run(model: &Model, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut texts = jobs[0].texts.len();
        while texts < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => {
                    texts += job.texts.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        // Each job's texts are tokenized alone, so one too-long text fails only its job.
        let mut ready = Vec::with_capacity(jobs.len());
        for job in jobs {
            match model.tokenize(&job.texts) {
                Ok(ids) => ready.push((job, ids)),
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        if ready.is_empty() {
            continue;
        }
        let all: Vec<&[u32]> = ready
            .iter()
            .flat_map(|(_, ids)| ids.iter().map(Vec::as_slice))
            .collect();
        match model.forward(&all) {
            Ok(mut vectors) => {
                let mut rest = vectors.drain(..);
                for (job, ids) in ready {
                    let mine: Vec<Vec<f32>> = rest.by_ref().take(ids.len()).collect();
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (job, _) in ready {
                    let _ = job.reply.send(Err(EmbedError::new(message.clone())));
                }
            }
        }
    }
}

impl Model {
    fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, EmbedError> {
        texts
            .iter()
            .map(|t| {
                let enc = self
                    .tokenizer
                    .encode(t.as_str(), true)
                    .map_err(|e| EmbedError::new(format!("tokenizing: {e}")))?;
                let ids = enc.get_ids();
                if ids.len() > self.max_tokens {
                    return Err(EmbedError::new(format!(
                        "{} tokens; the model takes at most {}",
                        ids.len(),
                        self.max_tokens
                    )));
                }
                Ok(ids.to_vec())
            })
            .collect()
    }

    fn forward(&self, batch: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let longest = batch.iter().map(|ids| ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch.len() * longest);
        let mut mask = Vec::with_capacity(batch.len() * longest);
        for row in batch {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(0, longest - row.len()));
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            mask.extend(std::iter::repeat_n(0u32, longest - row.len()));
        }
        let shape = (batch.len(), longest);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.bert.forward(&ids, &types, Some(&mask))?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                let counts = mask.sum(1)?;
                summed.broadcast_div(&counts)?
            }
        };
        let mut out = pooled.to_vec2::<f32>()?;
        out.iter_mut().for_each(|v| normalize(v));
        Ok(out)
    }
}

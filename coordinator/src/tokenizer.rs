//! Text to token ids and back: the checkpoint's `tokenizer.json` (Hugging Face `tokenizers`),
//! and incremental detokenization for streaming.

use std::path::Path;

use anyhow::{anyhow, Context, Result};

/// The served model's tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("loading {}", path.display()))?;
        Ok(Tokenizer { inner })
    }

    /// Encodes `text`; `add_special` adds BOS as the tokenizer's post-processor says.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i64>> {
        let encoding = self
            .inner
            .encode(text, add_special)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().iter().map(|&id| id as i64).collect())
    }

    /// Decodes `ids`, dropping special tokens (BOS, EOS).
    pub fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.inner.decode(&ids, true).unwrap_or_default()
    }

    /// Decodes `ids` as they are, special tokens included (vLLM's `/detokenize`).
    pub fn decode_all(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.inner.decode(&ids, false).unwrap_or_default()
    }

    /// Each id's vocabulary entry (`▁Hello`, `<0x0A>`), as `convert_ids_to_tokens` gives it.
    pub fn token_strings(&self, ids: &[i64]) -> Vec<String> {
        ids.iter()
            .map(|&id| self.inner.id_to_token(id as u32).unwrap_or_default())
            .collect()
    }

    /// Token `id`'s vocabulary entry, if the vocabulary has one.
    pub fn token(&self, id: i64) -> Option<String> {
        u32::try_from(id)
            .ok()
            .and_then(|id| self.inner.id_to_token(id))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a growing list of token ids into text increments, never splitting a UTF-8 character
/// (byte-fallback tokens) and keeping the spaces SentencePiece encodes in word-initial tokens.
///
/// As in text-generation-inference: decode a short window before the new tokens, decode the
/// window plus the new tokens, and emit the difference once it no longer ends in a partial
/// character. Seeding the window with the prompt's tail keeps the first generated word's space.
pub struct Detokenizer {
    ids: Vec<i64>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// Starts after `prompt` (its last few tokens give the first word its context).
    pub fn new(prompt: &[i64]) -> Self {
        let tail = prompt.len().saturating_sub(6);
        Detokenizer {
            ids: prompt[tail..].to_vec(),
            prefix_offset: 0,
            read_offset: prompt.len() - tail,
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: i64) -> String {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let after = tokenizer.decode(&self.ids[self.prefix_offset..]);
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before)
        {
            let delta = after[before.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else if !after.starts_with(&before) && !after.ends_with('\u{FFFD}') {
            // The window's decoding changed shape (rare); restart it at the new tokens.
            let delta = tokenizer.decode(&self.ids[self.read_offset..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }
}

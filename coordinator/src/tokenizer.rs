//! Text to token ids and back: the checkpoint's `tokenizer.json` (Hugging Face `tokenizers`),
//! incremental detokenization for streaming, and the Llama 2 chat template.

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

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Renders a conversation in the Llama 2 chat format, as the checkpoints' own template does:
/// `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] ...`.
/// Roles must alternate user/assistant after an optional system message, ending with a user turn.
pub fn llama2_chat_prompt(messages: &[ChatMessage]) -> Result<String, String> {
    let (system, turns) = match messages.first() {
        Some(m) if m.role == "system" => (Some(m.content.as_str()), &messages[1..]),
        _ => (None, messages),
    };
    if turns.is_empty() {
        return Err("messages must contain at least one user message".into());
    }
    let mut out = String::new();
    for (i, m) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if m.role != expected {
            return Err(format!(
                "messages[{}].role is {:?}: roles must alternate user/assistant after an optional system message",
                i + usize::from(system.is_some()),
                m.role
            ));
        }
        let content = match (i, system) {
            (0, Some(sys)) => format!("<<SYS>>\n{sys}\n<</SYS>>\n\n{}", m.content),
            _ => m.content.clone(),
        };
        if m.role == "user" {
            out += &format!("<s>[INST] {} [/INST]", content.trim());
        } else {
            out += &format!(" {} </s>", content.trim());
        }
    }
    if turns.len() % 2 == 0 {
        return Err("the last message must be from the user".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chat_template_matches_llama2_format() {
        // As in Meta's template, strip() applies to the system block plus the user's text, so the
        // user's leading space survives inside it.
        let p = llama2_chat_prompt(&[msg("system", "Be brief."), msg("user", " Hi! ")]).unwrap();
        assert_eq!(p, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi! [/INST]");
        let p = llama2_chat_prompt(&[msg("user", " Hi! ")]).unwrap();
        assert_eq!(p, "<s>[INST] Hi! [/INST]");
        let p = llama2_chat_prompt(&[msg("user", "a"), msg("assistant", "b"), msg("user", "c")])
            .unwrap();
        assert_eq!(p, "<s>[INST] a [/INST] b </s><s>[INST] c [/INST]");
    }

    #[test]
    fn chat_template_rejects_bad_conversations() {
        assert!(llama2_chat_prompt(&[]).is_err());
        assert!(llama2_chat_prompt(&[msg("system", "x")]).is_err());
        assert!(llama2_chat_prompt(&[msg("assistant", "x")])
            .unwrap_err()
            .contains("alternate"));
        assert!(
            llama2_chat_prompt(&[msg("user", "a"), msg("assistant", "b")])
                .unwrap_err()
                .contains("last message")
        );
    }
}

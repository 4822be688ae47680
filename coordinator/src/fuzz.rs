//! What the coordinator's `cargo fuzz` targets (`fuzz/`) check, also replayed by the regression
//! tests below: each takes arbitrary bytes, must never panic, and asserts what must hold of
//! whatever it accepts.
//!
//! - `request`: an HTTP body for either endpoint is refused with a 4xx, or validates into
//!   sampling parameters within their documented ranges.
//! - `chat_template`: a conversation renders with the built-in Llama 2 template exactly when
//!   its roles alternate as the template demands, and the rendering holds every turn.
//! - `detokenize`: streaming a sequence of token ids yields, piece by piece, the text decoding
//!   them all at once gives.

use std::{path::PathBuf, sync::OnceLock};

use crate::{
    api::{
        types::{parse_body, ChatRequest, CompletionRequest},
        validate::{ValidSampling, MAX_LOGPROBS, MAX_STOP_LENGTH, MAX_STOP_SEQUENCES},
    },
    chat_template::{ChatTemplate, RenderOptions, TemplateOrigin, LLAMA2_CHAT_TEMPLATE},
    tokenizer::{Detokenizer, Tokenizer},
};

/// Returns whether either endpoint accepted the body.
pub fn request(data: &[u8]) -> bool {
    let mut accepted = false;
    match parse_body::<CompletionRequest>(data) {
        Ok(req) => {
            let top = req.logprobs.unwrap_or(0).min(MAX_LOGPROBS);
            accepted |= check_sampling(req.sampling.validate(top, 32000, &[2]));
        }
        Err(e) => assert!(e.status.is_client_error(), "{e:?}"),
    }
    match parse_body::<ChatRequest>(data) {
        Ok(req) => {
            let top = req.top_logprobs.unwrap_or(0).min(MAX_LOGPROBS);
            let rendered = crate::api::types::chat_messages(&req.messages)
                .is_ok_and(|m| llama2().render(&m, &RenderOptions::default()).is_ok());
            accepted |= check_sampling(req.sampling.validate(top, 32000, &[2])) && rendered;
        }
        Err(e) => assert!(e.status.is_client_error(), "{e:?}"),
    }
    accepted
}

fn check_sampling(validated: Result<ValidSampling, crate::api::error::ApiError>) -> bool {
    let v = match validated {
        Ok(v) => v,
        Err(e) => {
            assert!(e.status.is_client_error(), "{e:?}");
            return false;
        }
    };
    let p = &v.params;
    assert!((0.0..=2.0).contains(&p.temperature), "{p:?}");
    assert!(p.top_p > 0.0 && p.top_p <= 1.0, "{p:?}");
    assert!((-2.0..=2.0).contains(&p.presence_penalty), "{p:?}");
    assert!((-2.0..=2.0).contains(&p.frequency_penalty), "{p:?}");
    assert!(p.top_logprobs <= MAX_LOGPROBS, "{p:?}");
    assert!(v.stop.len() <= MAX_STOP_SEQUENCES);
    assert!(v
        .stop
        .iter()
        .all(|s| !s.is_empty() && s.len() <= MAX_STOP_LENGTH));
    true
}

/// The built-in Llama 2 template with Llama 2's special tokens.
fn llama2() -> &'static ChatTemplate {
    static TEMPLATE: OnceLock<ChatTemplate> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let special = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"});
        ChatTemplate::compile(
            LLAMA2_CHAT_TEMPLATE.into(),
            TemplateOrigin::BuiltInLlama2,
            special.as_object().expect("an object").clone(),
        )
        .expect("the built-in template compiles")
    })
}

/// Messages as a role byte (0 system, 1 user, 2 assistant, anything else a stranger role) and
/// content, separated by 0xFF. Returns whether the conversation rendered.
pub fn chat_template(data: &[u8]) -> bool {
    let messages: Vec<(&str, String)> = data
        .split(|&b| b == 0xFF)
        .filter(|m| !m.is_empty())
        .map(|m| {
            let role = match m[0] {
                0 => "system",
                1 => "user",
                2 => "assistant",
                _ => "tool",
            };
            (role, String::from_utf8_lossy(&m[1..]).into_owned())
        })
        .collect();
    let json: Vec<serde_json::Value> = messages
        .iter()
        .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
        .collect();
    let roles: Vec<&str> = messages.iter().map(|m| m.0).collect();
    // Meta's template: after an optional system message, user turns exactly at even places.
    let turns = match roles.first() {
        Some(&"system") => &roles[1..],
        _ => &roles[..],
    };
    let well_formed = turns
        .iter()
        .enumerate()
        .all(|(i, r)| (*r == "user") == (i % 2 == 0));
    let options = RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    match llama2().render(&json, &options) {
        Ok(text) => {
            assert!(well_formed, "rendered {roles:?}");
            let shown = |(i, (role, content)): (usize, &(&str, String))| {
                // A system message shows inside the first user turn; stranger roles not at all.
                let shown = matches!(*role, "user" | "assistant")
                    || (i == 0 && *role == "system" && turns.first() == Some(&"user"));
                !shown || text.contains(content.trim())
            };
            assert!(
                messages.iter().enumerate().all(shown),
                "{text:?} lost a turn"
            );
            if turns.first() == Some(&"user") {
                assert!(text.starts_with("<s>[INST] "), "{text:?}");
            }
            if turns.last() == Some(&"user") {
                assert!(text.ends_with(" [/INST]"), "{text:?}");
            }
            true
        }
        Err(message) => {
            assert!(!well_formed, "refused {roles:?}: {message}");
            assert!(!message.0.is_empty());
            false
        }
    }
}

/// The tokenizer the detokenization target uses: `CARAVAN_FUZZ_TOKENIZER_DIR`, else the Llama 2
/// tokenizer `scripts/setup.sh` builds into `models/llama2-tokenizer`.
fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = std::env::var_os("CARAVAN_FUZZ_TOKENIZER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/llama2-tokenizer")
            });
        Tokenizer::load(&dir).expect("the fuzz tokenizer (set CARAVAN_FUZZ_TOKENIZER_DIR)")
    })
}

/// Byte 0 gives the prompt's length (mod 8); then little-endian u16 token ids (mod the
/// vocabulary). Streams the ids after the prompt through a [`Detokenizer`]. Returns whether the
/// streamed text was compared with the one-shot decoding.
pub fn detokenize(data: &[u8]) -> bool {
    let Some((&prompt_len, rest)) = data.split_first() else {
        return false;
    };
    let tokenizer = tokenizer();
    let vocab = tokenizer.vocab_size() as i64;
    let ids: Vec<i64> = rest
        .chunks_exact(2)
        .map(|b| i64::from(u16::from_le_bytes([b[0], b[1]])) % vocab)
        .collect();
    let (prompt, generated) = ids.split_at((prompt_len as usize % 8).min(ids.len()));
    let mut detokenizer = Detokenizer::new(prompt);
    let streamed: String = generated
        .iter()
        .map(|&id| detokenizer.push(tokenizer, id))
        .collect();
    // Decoding everything at once is the reference: what the stream printed is what follows
    // the prompt's text, once the generated text ends on a whole character.
    let whole = tokenizer.decode(&ids);
    let before = tokenizer.decode(prompt);
    if whole.contains('\u{FFFD}') || before.contains('\u{FFFD}') || !whole.starts_with(&before) {
        return false;
    }
    assert_eq!(
        streamed,
        whole[before.len()..],
        "ids {ids:?}, prompt {prompt:?}"
    );
    true
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn inputs(dir: &str) -> Vec<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz")
            .join(dir);
        std::fs::read_dir(&dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    fn replay(target: &str, check: fn(&[u8]) -> bool) {
        // The seeds (fuzz/scripts/make_seeds.py) are valid inputs: each must be accepted.
        let seeds = inputs(&format!("seeds/{target}"));
        assert!(
            !seeds.is_empty(),
            "no seeds: run fuzz/scripts/make_seeds.py"
        );
        for seed in seeds {
            assert!(
                check(&std::fs::read(&seed).unwrap()),
                "{} refused",
                seed.display()
            );
        }
        // Every input the fuzzer ever crashed on must now pass its checks.
        for input in inputs(&format!("regressions/{target}")) {
            check(&std::fs::read(&input).unwrap());
        }
    }

    #[test]
    fn request_seeds_and_regressions() {
        replay("request", super::request);
    }

    #[test]
    fn chat_template_seeds_and_regressions() {
        replay("chat_template", super::chat_template);
    }

    #[test]
    fn detokenize_seeds_and_regressions() {
        replay("detokenize", super::detokenize);
    }
}

//! Structured outputs: a request's JSON schema, regex, choices or Lark grammar becomes an
//! llguidance matcher here, which gives before each sampled token the set of tokens allowed
//! next. The set travels in the step plan as a bitmask, and every rank masks its (identical)
//! logits with it before sampling, so all ranks still choose the same token.

use std::{path::Path, sync::Arc};

use anyhow::{anyhow, Context, Result};
use llguidance::{
    api::TopLevelGrammar,
    toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv},
    Matcher, ParserFactory,
};
use serde_json::{json, Value};

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// A JSON value matching this JSON schema.
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// Text matching this regex (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this Lark grammar (llguidance's dialect).
    Lark(String),
}

impl ConstraintSpec {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            ConstraintSpec::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(compact(schema))
            }
            ConstraintSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(&json!({"type": "object"})))
            }
            ConstraintSpec::Regex(regex) => TopLevelGrammar::from_regex(regex),
            ConstraintSpec::Choice(choices) => {
                // As llguidance's own Python helper writes it: JSON string literals are Lark's.
                let alternatives: Vec<String> = choices
                    .iter()
                    .map(|c| Value::String(c.clone()).to_string())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            ConstraintSpec::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
        }
    }
}

/// A schema whose JSON has no free whitespace (unless the schema sets llguidance's own
/// options): a model cannot then spend its tokens on spaces and newlines between the values.
fn compact(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(fields) = &mut schema {
        fields
            .entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    schema
}

/// The served tokenizer as llguidance sees it: every token's bytes, and the tokenizer itself
/// for the text a grammar forces.
struct TokenizerBytes {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for TokenizerBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.tokenizer
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// Drops `Prepend` normalizers (Llama 2's "▁" before every text): text a grammar forces is a
/// continuation, not the start of a prompt.
fn without_prepend(
    normalizer: tokenizers::NormalizerWrapper,
) -> Option<tokenizers::NormalizerWrapper> {
    use tokenizers::{normalizers::Sequence, NormalizerWrapper};
    match normalizer {
        NormalizerWrapper::Prepend(_) => None,
        NormalizerWrapper::Sequence(sequence) => {
            let kept: Vec<_> = sequence
                .as_ref()
                .iter()
                .filter_map(|n| without_prepend(n.clone()))
                .collect();
            (!kept.is_empty()).then(|| NormalizerWrapper::Sequence(Sequence::new(kept)))
        }
        other => Some(other),
    }
}

/// Compiles constraints for the served model (built once at start: ~0.2 s for a 32000-token
/// vocabulary). A tokenizer llguidance cannot read leaves the server serving, with structured
/// outputs refused.
pub struct Grammars {
    compiler: std::result::Result<Compiler, String>,
}

struct Compiler {
    factory: Arc<ParserFactory>,
    /// Bytes of one mask: the model's logits width, in bits, rounded up to 32-bit words.
    mask_bytes: usize,
}

impl Grammars {
    /// From `dir/tokenizer.json`, for a model with `vocab_size` logits and these
    /// end-of-sequence tokens.
    pub fn load(dir: &Path, vocab_size: usize, eos_token_ids: &[i64]) -> Self {
        let compiler = Compiler::load(dir, vocab_size, eos_token_ids).map_err(|e| {
            tracing::warn!(error = %format!("{e:#}"), "structured outputs are unavailable");
            format!("structured outputs are unavailable for this model's tokenizer: {e:#}")
        });
        Grammars { compiler }
    }

    /// A fresh constraint for one sequence; `Err` is the client's mistake (a schema or grammar
    /// that does not compile), in llguidance's words.
    pub fn constrain(&self, spec: &ConstraintSpec) -> std::result::Result<Constraint, String> {
        let compiler = self.compiler.as_ref().map_err(Clone::clone)?;
        let matcher = Matcher::new(compiler.factory.create_parser(spec.grammar()));
        if let Some(error) = matcher.get_error() {
            return Err(error);
        }
        Ok(Constraint {
            matcher,
            mask_bytes: compiler.mask_bytes,
        })
    }
}

impl Compiler {
    fn load(dir: &Path, vocab_size: usize, eos_token_ids: &[i64]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let json: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        // Logits beyond the tokenizer's tokens are no text: never allowed by a grammar.
        while words.len() < vocab_size {
            words.push(format!("\u{ff}<unused_{}>", words.len()).into_bytes());
        }
        words.truncate(vocab_size);
        let eos: Vec<TokenId> = eos_token_ids
            .iter()
            .filter_map(|&id| u32::try_from(id).ok())
            .collect();
        let first_eos = *eos
            .first()
            .context("structured outputs need an end-of-sequence token")?;
        let info = TokRxInfo::new(words.len() as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        let mut tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow!("{e}"))?;
        if let Some(normalizer) = tokenizer.get_normalizer().cloned() {
            tokenizer.with_normalizer(without_prepend(normalizer));
        }
        let env: TokEnv = Arc::new(TokenizerBytes { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| anyhow!("{e}"))?;
        factory.set_stderr_log_level(0);
        factory.limits_mut().verbose_errors = false;
        Ok(Compiler {
            factory: Arc::new(factory),
            mask_bytes: vocab_size.div_ceil(32) * 4,
        })
    }
}

/// One sequence's constraint, advanced token by token.
pub struct Constraint {
    matcher: Matcher,
    mask_bytes: usize,
}

impl Constraint {
    /// The tokens allowed next, as a bitmask: bit `t % 8` of byte `t / 8` (little-endian 32-bit
    /// words, as vLLM, SGLang and llama.cpp lay theirs out). After the grammar has ended, only
    /// end-of-sequence.
    pub fn mask(&mut self) -> Result<Vec<u8>, String> {
        let mask = if self.matcher.is_stopped() {
            self.matcher.compute_mask_or_eos()
        } else {
            self.matcher.compute_mask()
        }
        .map_err(|e| e.to_string())?;
        if mask.num_set() == 0 {
            return Err("the grammar allows no token here".into());
        }
        let mut bytes: Vec<u8> = mask
            .as_slice()
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .collect();
        bytes.resize(self.mask_bytes, 0);
        Ok(bytes)
    }

    /// Records a sampled token (`eos`: an end-of-sequence token); returns whether the output is
    /// complete: the grammar has ended and nothing may follow.
    pub fn accept(&mut self, token: i64, eos: bool) -> Result<bool, String> {
        if eos && self.matcher.is_stopped() {
            return Ok(true);
        }
        let token = u32::try_from(token).map_err(|_| format!("token {token} is not an id"))?;
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("token {token} breaks the grammar: {e}"))?;
        Ok(eos || self.matcher.is_stopped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammars() -> Grammars {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/llama2-tokenizer");
        let g = Grammars::load(&dir, 32000, &[2]);
        assert!(
            g.compiler.is_ok(),
            "the project's tokenizer (scripts/setup.sh)"
        );
        g
    }

    fn allowed(mask: &[u8], token: u32) -> bool {
        mask[token as usize / 8] & (1 << (token % 8)) != 0
    }

    #[test]
    fn a_choice_allows_only_its_tokens_and_ends_with_the_text() {
        let g = grammars();
        let mut c = g
            .constrain(&ConstraintSpec::Choice(vec!["yes".into(), "no".into()]))
            .unwrap();
        let mask = c.mask().unwrap();
        assert_eq!(mask.len(), 4000);
        // "yes" is 3582 and "no" 1217 in Llama 2's vocabulary (and "y" 29891); "maybe" (26026)
        // and "▁yes" (4874) are not allowed.
        assert!(allowed(&mask, 3582) && allowed(&mask, 1217) && allowed(&mask, 29891));
        assert!(!allowed(&mask, 26026) && !allowed(&mask, 4874));
        assert!(!allowed(&mask, 2), "nor end-of-sequence yet");
        assert_eq!(c.accept(3582, false), Ok(true), "the choice is complete");
        let after = c.mask().unwrap();
        assert!(
            allowed(&after, 2) && !allowed(&after, 3582),
            "then only end-of-sequence"
        );
        assert_eq!(c.accept(2, true), Ok(true));
    }

    #[test]
    fn a_token_outside_the_mask_is_an_error_and_bad_grammars_are_refused() {
        let g = grammars();
        let mut c = g
            .constrain(&ConstraintSpec::Regex("[0-9]+".into()))
            .unwrap();
        assert!(c.accept(3582, false).is_err());
        let e = g
            .constrain(&ConstraintSpec::JsonSchema(json!({"type": "frobnicate"})))
            .err()
            .unwrap();
        assert!(e.contains("frobnicate"), "{e}");
        assert!(g
            .constrain(&ConstraintSpec::Lark("start: nothing_defined".into()))
            .is_err());
    }

    #[test]
    fn a_tokenizer_that_cannot_be_read_refuses_constraints_and_says_why() {
        let g = Grammars::load(Path::new("/nonexistent"), 32000, &[2]);
        let e = g.constrain(&ConstraintSpec::JsonObject).err().unwrap();
        assert!(
            e.contains("unavailable") && e.contains("tokenizer.json"),
            "{e}"
        );
    }
}

//! The served model's chat template: the checkpoint folder's own Jinja template (or
//! `--chat-template`), rendered with minijinja under Hugging Face `apply_chat_template` semantics.
//!
//! Where the template comes from, first found wins: `--chat-template` (a file, or the template
//! itself), `chat_template.jinja` in the folder, `chat_template` in `tokenizer_config.json` (a
//! string, or a list of named templates of which `default` is used), else Meta's Llama 2 chat
//! template. Rendering follows `transformers`: `trim_blocks` and `lstrip_blocks`, loop controls,
//! Python string and dict methods (`.strip()`, `.items()`), `raise_exception`, `strftime_now`, a
//! `tojson` that writes what Python's `json.dumps` writes, the tokenizer's special tokens
//! (`bos_token`, `eos_token`, ...) as variables (from `tokenizer_config.json` or
//! `special_tokens_map.json`, else `config.json`'s BOS and EOS ids spelled by the tokenizer),
//! and `continue_final_message` cut as
//! `transformers` cuts it. The rendered text is tokenized without adding special tokens: a
//! template that wants BOS writes it.

use std::{fmt, path::Path};

use anyhow::{bail, Context, Result};
use minijinja::{
    syntax::SyntaxConfig,
    value::{Kwargs, Serde},
    Environment, Error as JinjaError, ErrorKind, Value,
};
use serde_json::{Map, Value as Json};

/// Meta's Llama-2-chat template, as its `tokenizer_config.json` carries it.
pub const LLAMA2_CHAT_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// The name the template is registered under (not `.html`, so nothing is auto-escaped).
const NAME: &str = "chat";

/// The special-token variables `transformers` hands a template, from `tokenizer_config.json`
/// (or `special_tokens_map.json`).
const SPECIAL_TOKENS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Variables a request's `chat_template_kwargs` may not set: the renderer's own.
const RESERVED_VARIABLES: &[&str] = &["messages", "add_generation_prompt"];

/// Where the served template came from (logged at start, shown in `/admin/status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// `--chat-template FILE`.
    Flag(String),
    /// `--chat-template` given the template itself.
    Inline,
    /// The folder's `chat_template.jinja`.
    JinjaFile,
    /// `chat_template` in the folder's `tokenizer_config.json`.
    TokenizerConfig,
    /// None in the folder: Meta's Llama 2 template.
    BuiltInLlama2,
}

impl fmt::Display for TemplateOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateOrigin::Flag(path) => write!(f, "--chat-template {path}"),
            TemplateOrigin::Inline => f.write_str("--chat-template (inline)"),
            TemplateOrigin::JinjaFile => f.write_str("chat_template.jinja"),
            TemplateOrigin::TokenizerConfig => f.write_str("tokenizer_config.json"),
            TemplateOrigin::BuiltInLlama2 => f.write_str("built-in Llama 2"),
        }
    }
}

/// What one rendering is asked for (vLLM's chat request fields).
#[derive(Debug, Clone, Default)]
pub struct RenderOptions<'a> {
    /// End with the opening of an assistant turn.
    pub add_generation_prompt: bool,
    /// Leave the last (assistant) message open, so generation continues it.
    pub continue_final_message: bool,
    /// Extra template variables (`chat_template_kwargs`).
    pub kwargs: Option<&'a Map<String, Json>>,
}

/// Why a conversation did not render: the client's fault, answered with a 400 and this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

/// A compiled chat template with the tokenizer's special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: TemplateOrigin,
    special_tokens: Map<String, Json>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The template for the checkpoint folder `dir`; `flag` is `--chat-template` (a file path,
    /// or the template itself when no such file exists and it holds Jinja tags, as in vLLM).
    /// `known` holds special tokens known otherwise ([`special_tokens_from_ids`]), used for
    /// those the folder's `tokenizer_config.json` or `special_tokens_map.json` does not name.
    pub fn load(dir: &Path, flag: Option<&str>, known: &Map<String, Json>) -> Result<Self> {
        let config = read_json_object(&dir.join("tokenizer_config.json"))?;
        let mut special = special_tokens(config.as_ref());
        if special.is_empty() {
            special =
                special_tokens(read_json_object(&dir.join("special_tokens_map.json"))?.as_ref());
        }
        for (name, text) in known {
            special.entry(name.clone()).or_insert_with(|| text.clone());
        }
        let (source, origin) = match flag {
            Some(flag) if Path::new(flag).is_file() => (
                std::fs::read_to_string(flag)
                    .with_context(|| format!("reading --chat-template {flag}"))?,
                TemplateOrigin::Flag(flag.to_string()),
            ),
            Some(flag) if flag.contains("{%") || flag.contains("{{") => {
                (flag.to_string(), TemplateOrigin::Inline)
            }
            Some(flag) => bail!("--chat-template {flag}: no such file, and not a Jinja template"),
            None => match folder_template(dir, config.as_ref())? {
                Some(found) => found,
                None => (
                    LLAMA2_CHAT_TEMPLATE.to_string(),
                    TemplateOrigin::BuiltInLlama2,
                ),
            },
        };
        Self::compile(source, origin, special)
    }

    /// Compiles `source`; `special_tokens` maps `bos_token` and the others to their text.
    pub fn compile(
        source: String,
        origin: TemplateOrigin,
        special_tokens: Map<String, Json>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source)
            .map_err(|e| anyhow::anyhow!("{}", e.display_debug_info()))
            .with_context(|| format!("compiling the chat template ({origin})"))?;
        Ok(ChatTemplate {
            env,
            origin,
            special_tokens,
        })
    }

    pub fn origin(&self) -> &TemplateOrigin {
        &self.origin
    }

    /// Renders `messages` (OpenAI chat messages; text content parts already joined) to the
    /// prompt text.
    pub fn render(
        &self,
        messages: &[Json],
        options: &RenderOptions,
    ) -> Result<String, RenderError> {
        if options.add_generation_prompt && options.continue_final_message {
            return Err(RenderError(
                "add_generation_prompt and continue_final_message cannot both be true: set \
                 add_generation_prompt to false to continue the final message"
                    .into(),
            ));
        }
        let mut context = self.special_tokens.clone();
        if let Some(kwargs) = options.kwargs {
            if let Some(name) = kwargs
                .keys()
                .find(|k| RESERVED_VARIABLES.contains(&k.as_str()))
            {
                return Err(RenderError(format!(
                    "chat_template_kwargs may not set `{name}`"
                )));
            }
            context.extend(kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        context.insert(
            "add_generation_prompt".into(),
            Json::Bool(options.add_generation_prompt),
        );
        let tagged;
        let messages = if options.continue_final_message {
            tagged = tag_final_message(messages)?;
            &tagged[..]
        } else {
            messages
        };
        context.insert("messages".into(), Json::Array(messages.to_vec()));
        let template = self.env.get_template(NAME).expect("compiled at load");
        let rendered = template
            .render(Value::from(Serde(&context)))
            .map_err(render_error)?;
        if options.continue_final_message {
            let last = &messages[messages.len() - 1]["content"];
            let final_text = last.as_str().unwrap_or_default();
            return cut_at_tag(rendered, final_text.trim_end_matches(CONTINUE_TAG));
        }
        Ok(rendered)
    }
}

/// The template text in the folder, if any, and where it was.
fn folder_template(
    dir: &Path,
    config: Option<&Map<String, Json>>,
) -> Result<Option<(String, TemplateOrigin)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja)
            .with_context(|| format!("reading {}", jinja.display()))?;
        return Ok(Some((text, TemplateOrigin::JinjaFile)));
    }
    let Some(template) = config.and_then(|c| c.get("chat_template")) else {
        return Ok(None);
    };
    let text = match template {
        Json::String(text) => text.clone(),
        // transformers' named templates: [{"name": ..., "template": ...}, ...].
        Json::Array(named) => {
            let default = named
                .iter()
                .find(|t| t.get("name") == Some(&Json::from("default")));
            match default
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
            {
                Some(text) => text.to_string(),
                None => bail!(
                    "tokenizer_config.json holds several chat templates and none is named \
                     \"default\"; choose one with --chat-template"
                ),
            }
        }
        Json::Null => return Ok(None),
        _ => bail!(
            "tokenizer_config.json: chat_template must be a string or a list of named templates"
        ),
    };
    Ok(Some((text, TemplateOrigin::TokenizerConfig)))
}

fn read_json_object(path: &Path) -> Result<Option<Map<String, Json>>> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(Json::Object(map)) => Ok(Some(map)),
            Ok(_) => bail!("{}: expected a JSON object", path.display()),
            Err(e) => Err(e).with_context(|| format!("parsing {}", path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `bos_token` and `eos_token` from `config.json`'s `bos_token_id` and (first) `eos_token_id`,
/// as `token_text` (the tokenizer's vocabulary) spells them: what a folder without
/// `tokenizer_config.json` still says of its special tokens.
pub fn special_tokens_from_ids(
    token_text: impl Fn(i64) -> Option<String>,
    bos_token_id: Option<i64>,
    eos_token_ids: &[i64],
) -> Map<String, Json> {
    let mut tokens = Map::new();
    for (name, id) in [
        ("bos_token", bos_token_id),
        ("eos_token", eos_token_ids.first().copied()),
    ] {
        if let Some(text) = id.and_then(&token_text) {
            tokens.insert(name.to_string(), Json::String(text));
        }
    }
    tokens
}

/// `bos_token` and the others as text: a token is a string or an AddedToken object
/// (`{"content": "<s>", ...}`).
fn special_tokens(config: Option<&Map<String, Json>>) -> Map<String, Json> {
    let mut tokens = Map::new();
    for &name in SPECIAL_TOKENS {
        let text = match config.and_then(|c| c.get(name)) {
            Some(Json::String(text)) => text.clone(),
            Some(Json::Object(token)) => match token.get("content").and_then(Json::as_str) {
                Some(text) => text.to_string(),
                None => continue,
            },
            _ => continue,
        };
        tokens.insert(name.to_string(), Json::String(text));
    }
    tokens
}

/// Marks an error raised by the template itself, whose message is the client's answer.
#[derive(Debug)]
struct Raised;

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message).with_source(Raised))
}

fn render_error(e: JinjaError) -> RenderError {
    let raised = std::error::Error::source(&e).is_some_and(|s| s.is::<Raised>());
    match (raised, e.detail()) {
        (true, Some(message)) => RenderError(message.to_string()),
        _ => RenderError(format!(
            "the chat template failed on this conversation: {}{}",
            e.detail().unwrap_or("error"),
            e.line()
                .map(|l| format!(" (template line {l})"))
                .unwrap_or_default()
        )),
    }
}

/// `datetime.now().strftime(format)`, in the machine's time zone.
fn strftime_now(format: String) -> Result<Value, JinjaError> {
    jiff::fmt::strtime::format(&format, &jiff::Zoned::now())
        .map(Value::from)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("strftime_now: {e}")))
}

/// `transformers`' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, so the text matches what Python renders byte for byte (minijinja's own
/// filter escapes `<`, `>`, `&` and `'` for HTML).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match &indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_str(), i64::try_from(v.clone())) {
            (Some(s), _) => Some(s.to_string()),
            (None, Ok(n)) => Some(" ".repeat(n.max(0) as usize)),
            _ => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair of strings",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let dumps = PythonJson {
        indent,
        item,
        key,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    dumps.write(&json, 0, &mut out);
    Ok(Value::from(out))
}

/// Python's `json.dumps` layout.
struct PythonJson {
    indent: Option<String>,
    item: String,
    key: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PythonJson {
    fn write(&self, value: &Json, level: usize, out: &mut String) {
        match value {
            Json::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separate(i, level + 1, out);
                    self.write(item, level + 1, out);
                }
                self.close(level, out);
                out.push(']');
            }
            Json::Object(fields) if !fields.is_empty() => {
                let mut fields: Vec<_> = fields.iter().collect();
                if self.sort_keys {
                    fields.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (name, item)) in fields.into_iter().enumerate() {
                    self.separate(i, level + 1, out);
                    self.string(name, out);
                    out.push_str(&self.key);
                    self.write(item, level + 1, out);
                }
                self.close(level, out);
                out.push('}');
            }
            Json::Array(_) => out.push_str("[]"),
            Json::Object(_) => out.push_str("{}"),
            Json::String(s) => self.string(s, out),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Null => out.push_str("null"),
            Json::Number(n) => match n.as_f64().filter(|_| n.is_f64()) {
                // Python writes integral floats with ".0", as serde_json does; exponents as
                // "1e+20" where serde_json writes "1e20".
                Some(f) if f.abs() >= 1e16 || (f != 0.0 && f.abs() < 1e-4) => {
                    out.push_str(&python_exponent(f))
                }
                _ => out.push_str(&n.to_string()),
            },
        }
    }

    fn separate(&self, index: usize, level: usize, out: &mut String) {
        if index > 0 {
            out.push_str(&self.item);
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
    }

    fn close(&self, level: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let escaped = serde_json::to_string(s).expect("a string serializes");
        if !self.ensure_ascii {
            out.push_str(&escaped);
            return;
        }
        for c in escaped.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
}

/// `repr(f)` for the floats Python writes with an exponent: `1e+20`, `1.5e-07`.
fn python_exponent(f: f64) -> String {
    let text = format!("{f:e}");
    match text.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => text,
    }
}

/// What `transformers` appends to the final message for `continue_final_message`, to find where
/// the message ends in the rendered text.
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// The final message with [`CONTINUE_TAG`] after its content.
fn tag_final_message(messages: &[Json]) -> Result<Vec<Json>, RenderError> {
    let mut messages = messages.to_vec();
    let Some(last) = messages.last_mut() else {
        return Err(RenderError(
            "continue_final_message is set but the conversation is empty".into(),
        ));
    };
    match last.get_mut("content") {
        Some(Json::String(text)) => text.push_str(CONTINUE_TAG),
        _ => {
            return Err(RenderError(
                "continue_final_message is set but the final message has no text to continue"
                    .into(),
            ))
        }
    }
    Ok(messages)
}

/// `transformers`' cut for `continue_final_message`: the rendered text up to where the tagged
/// final message ends, so generation continues it instead of starting a new turn. When the
/// template trimmed the message's end, the cut drops trailing whitespace too.
fn cut_at_tag(rendered: String, final_text: &str) -> Result<String, RenderError> {
    let tag = CONTINUE_TAG.trim();
    let (true, Some(at)) = (rendered.contains(final_text.trim()), rendered.rfind(tag)) else {
        return Err(RenderError(
            "continue_final_message is set but the final message does not appear in the chat \
             after applying the chat template"
                .into(),
        ));
    };
    let spacing_kept = rendered[at..].starts_with(CONTINUE_TAG);
    let mut rendered = rendered;
    rendered.truncate(at);
    if !spacing_kept {
        rendered.truncate(rendered.trim_end().len());
    }
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama2() -> ChatTemplate {
        let special = json!({"bos_token": "<s>", "eos_token": "</s>"});
        ChatTemplate::compile(
            LLAMA2_CHAT_TEMPLATE.into(),
            TemplateOrigin::BuiltInLlama2,
            special.as_object().unwrap().clone(),
        )
        .unwrap()
    }

    fn msg(role: &str, content: &str) -> Json {
        json!({"role": role, "content": content})
    }

    fn generation() -> RenderOptions<'static> {
        RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        }
    }

    #[test]
    fn llama2_template_renders_meta_format() {
        // As in Meta's template, strip() applies to the system block plus the user's text, so the
        // user's leading space survives inside it.
        let t = llama2();
        let p = t
            .render(
                &[msg("system", "Be brief."), msg("user", " Hi! ")],
                &generation(),
            )
            .unwrap();
        assert_eq!(p, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi! [/INST]");
        let p = t.render(&[msg("user", " Hi! ")], &generation()).unwrap();
        assert_eq!(p, "<s>[INST] Hi! [/INST]");
        let turns = [msg("user", "a"), msg("assistant", "b"), msg("user", "c")];
        let p = t.render(&turns, &generation()).unwrap();
        assert_eq!(p, "<s>[INST] a [/INST] b </s><s>[INST] c [/INST]");
    }

    #[test]
    fn raise_exception_is_the_clients_message() {
        let err = llama2()
            .render(&[msg("assistant", "x")], &generation())
            .unwrap_err();
        assert_eq!(
            err.0,
            "Conversation roles must alternate user/assistant/user/assistant/..."
        );
    }

    #[test]
    fn whitespace_control_is_transformers() {
        // trim_blocks drops the newline after a block tag, lstrip_blocks the indent before it.
        let source = "{% for m in messages %}\n  {% if m.role == 'user' %}\n<|user|>{{ m.content }}\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::compile(source.into(), TemplateOrigin::Inline, Map::new()).unwrap();
        let p = t.render(&[msg("user", "hi")], &generation()).unwrap();
        assert_eq!(p, "<|user|>hi\n");
    }

    #[test]
    fn tojson_writes_python_json() {
        let source = "{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|{{ 'é<' | tojson }}|{{ 'é' | tojson(ensure_ascii=true) }}";
        let t = ChatTemplate::compile(source.into(), TemplateOrigin::Inline, Map::new()).unwrap();
        let kwargs = json!({"tools": [{"a": 1, "b": [true, null, 0.5]}, []]});
        let options = RenderOptions {
            kwargs: kwargs.as_object(),
            ..Default::default()
        };
        let p = t.render(&[], &options).unwrap();
        assert_eq!(
            p,
            "[{\"a\": 1, \"b\": [true, null, 0.5]}, []]|[\n  {\n    \"a\": 1,\n    \"b\": [\n      true,\n      null,\n      0.5\n    ]\n  },\n  []\n]|\"é<\"|\"\\u00e9\""
        );
        assert_eq!(python_exponent(1e20), "1e+20");
        assert_eq!(python_exponent(1.5e-7), "1.5e-07");
    }

    #[test]
    fn kwargs_and_special_tokens_reach_the_template() {
        let source = "{{ bos_token }}{{ greeting | default('none') }}{% if add_generation_prompt %}>{% endif %}";
        let special = json!({"bos_token": "<s>"});
        let t = ChatTemplate::compile(
            source.into(),
            TemplateOrigin::Inline,
            special.as_object().unwrap().clone(),
        )
        .unwrap();
        assert_eq!(t.render(&[], &RenderOptions::default()).unwrap(), "<s>none");
        let kwargs = json!({"greeting": "hello"});
        let options = RenderOptions {
            add_generation_prompt: true,
            kwargs: kwargs.as_object(),
            ..Default::default()
        };
        assert_eq!(t.render(&[], &options).unwrap(), "<s>hello>");
        let bad = json!({"messages": []});
        let options = RenderOptions {
            kwargs: bad.as_object(),
            ..Default::default()
        };
        assert!(t.render(&[], &options).unwrap_err().0.contains("messages"));
    }

    #[test]
    fn continue_final_message_cuts_after_the_last_content() {
        let t = llama2();
        let turns = [msg("user", "a"), msg("assistant", "The answer is ")];
        let options = RenderOptions {
            continue_final_message: true,
            ..Default::default()
        };
        // The template strips the content but writes a space after it, so the message's own
        // trailing whitespace is kept, as transformers 5 keeps it.
        assert_eq!(
            t.render(&turns, &options).unwrap(),
            "<s>[INST] a [/INST] The answer is "
        );
        let spaced = [msg("user", "a"), msg("assistant", "The answer is\n\n")];
        assert_eq!(
            t.render(&spaced, &options).unwrap(),
            "<s>[INST] a [/INST] The answer is\n\n"
        );
        // A template that writes nothing after the content: the tag's space is trimmed, so the
        // cut trims too.
        let bare = ChatTemplate::compile(
            "{% for m in messages %}{{ m.content | trim }}{% endfor %}".into(),
            TemplateOrigin::Inline,
            Map::new(),
        )
        .unwrap();
        assert_eq!(bare.render(&spaced, &options).unwrap(), "aThe answer is");
        let both = RenderOptions {
            continue_final_message: true,
            add_generation_prompt: true,
            ..Default::default()
        };
        assert!(t.render(&turns, &both).is_err());
    }

    #[test]
    fn folder_templates_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                            "chat_template": "cfg{{ bos_token }}"});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let t = ChatTemplate::load(dir.path(), None, &Map::new()).unwrap();
        assert_eq!(t.origin(), &TemplateOrigin::TokenizerConfig);
        assert_eq!(t.render(&[], &RenderOptions::default()).unwrap(), "cfg<s>");
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "jinja{{ eos_token }}",
        )
        .unwrap();
        let t = ChatTemplate::load(dir.path(), None, &Map::new()).unwrap();
        assert_eq!(t.origin(), &TemplateOrigin::JinjaFile);
        assert_eq!(
            t.render(&[], &RenderOptions::default()).unwrap(),
            "jinja</s>"
        );
        let t = ChatTemplate::load(dir.path(), Some("inline{{ 1 + 1 }}"), &Map::new()).unwrap();
        assert_eq!(t.render(&[], &RenderOptions::default()).unwrap(), "inline2");
        assert!(ChatTemplate::load(dir.path(), Some("/no/such/file"), &Map::new()).is_err());
        assert!(ChatTemplate::load(dir.path(), Some("{% if %}"), &Map::new()).is_err());

        let named = json!({"chat_template": [{"name": "tool_use", "template": "t"},
                                             {"name": "default", "template": "d"}]});
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), named.to_string()).unwrap();
        let t = ChatTemplate::load(dir.path(), None, &Map::new()).unwrap();
        assert_eq!(t.render(&[], &RenderOptions::default()).unwrap(), "d");
        let dir = tempfile::tempdir().unwrap();
        let t = ChatTemplate::load(dir.path(), None, &Map::new()).unwrap();
        assert_eq!(t.origin(), &TemplateOrigin::BuiltInLlama2);
    }

    #[test]
    fn a_folder_without_tokenizer_config_takes_its_special_tokens_from_the_ids() {
        let vocab = |id: i64| match id {
            1 => Some("<s>".to_string()),
            2 => Some("</s>".to_string()),
            _ => None,
        };
        let known = special_tokens_from_ids(vocab, Some(1), &[2, 7]);
        assert_eq!(
            known,
            json!({"bos_token": "<s>", "eos_token": "</s>"})
                .as_object()
                .unwrap()
                .clone()
        );
        assert!(special_tokens_from_ids(vocab, None, &[9]).is_empty());

        // Only tokenizer.json and config.json: the built-in Llama 2 template renders with them.
        let dir = tempfile::tempdir().unwrap();
        let t = ChatTemplate::load(dir.path(), None, &known).unwrap();
        assert_eq!(t.origin(), &TemplateOrigin::BuiltInLlama2);
        let turns = [
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Hello"}),
            json!({"role": "user", "content": "Bye"}),
        ];
        assert_eq!(
            t.render(&turns, &RenderOptions::default()).unwrap(),
            "<s>[INST] Hi [/INST] Hello </s><s>[INST] Bye [/INST]"
        );

        // What the folder names wins.
        let config = json!({"bos_token": "<BOS>"});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let t =
            ChatTemplate::load(dir.path(), Some("{{ bos_token }}{{ eos_token }}"), &known).unwrap();
        assert_eq!(
            t.render(&[], &RenderOptions::default()).unwrap(),
            "<BOS></s>"
        );
    }
}

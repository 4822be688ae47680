//! A streamed answer: each choice's events as server-sent events, the usage chunk, `[DONE]`.

use std::convert::Infallible;

use axum::response::sse::Event as SseEvent;
use futures::{stream, Stream, StreamExt};
use serde_json::Value;

use super::{
    completions::Submitted,
    error::ApiError,
    render::{LogprobEntry, ResponseMeta},
};
use crate::output::Event;

/// One choice of a streamed response.
struct ChoiceStream {
    index: usize,
    first: bool,
    /// Characters sent so far (for `text_offset`).
    offset: usize,
    /// `echo`'s text, sent as the first chunk (with the prompt's log-probabilities).
    echo: Option<String>,
    done: bool,
    /// The first choice of its prompt: its prompt tokens count in the usage.
    counts_prompt: bool,
}

/// What one event of a choice sends.
enum Sent {
    Nothing,
    Chunk(Value),
    Last {
        chunk: Value,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(Value),
}

impl ChoiceStream {
    fn on(&mut self, meta: &ResponseMeta, event: Event) -> Sent {
        let index = self.index;
        match event {
            Event::Prompt(prompt) => {
                let Some(text) = self.echo.take() else {
                    return Sent::Nothing;
                };
                let entries: Vec<LogprobEntry> = prompt.iter().map(LogprobEntry::from).collect();
                let mut chunk = meta.chunk(index, &text, &[], 0, None, self.first);
                chunk["choices"][0]["logprobs"] = meta.entries_json(&entries, 0);
                self.offset = text.chars().count();
                self.first = false;
                Sent::Chunk(chunk)
            }
            Event::Token { text, token } => {
                if let Some(echo) = self.echo.take() {
                    // No prompt log-probabilities were asked for: the text alone.
                    let echoed = echo.chars().count();
                    let mut chunk = meta.chunk(
                        index,
                        &(echo + &text),
                        std::slice::from_ref(&token),
                        echoed,
                        None,
                        self.first,
                    );
                    if meta.logprobs.is_none() {
                        chunk["choices"][0]["logprobs"] = Value::Null;
                    }
                    self.offset = echoed + token.piece.chars().count();
                    self.first = false;
                    return Sent::Chunk(chunk);
                }
                if text.is_empty() && meta.logprobs.is_none() && !self.first {
                    return Sent::Nothing;
                }
                let chunk = meta.chunk(
                    index,
                    &text,
                    std::slice::from_ref(&token),
                    self.offset,
                    None,
                    self.first,
                );
                self.offset += token.piece.chars().count();
                self.first = false;
                Sent::Chunk(chunk)
            }
            Event::Finished {
                text,
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                self.done = true;
                Sent::Last {
                    chunk: meta.chunk(index, &text, &[], self.offset, Some(reason), self.first),
                    prompt_tokens,
                    completion_tokens,
                }
            }
            Event::Error(message) => Sent::Failed(ApiError::unavailable(message).body()),
        }
    }
}

/// Streams every choice's chunks as server-sent events as they come, then (with
/// `include_usage`) a chunk with the usage and no choices, then `[DONE]`. A failed choice ends
/// the stream with the error. Dropping the stream (client gone) closes the channels, which the
/// scheduler takes as cancellations.
pub(super) fn sse_stream(
    meta: ResponseMeta,
    echoes: Vec<Option<String>>,
    n: usize,
    submitted: Vec<Submitted>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct S<E> {
        meta: ResponseMeta,
        events: E,
        choices: Vec<ChoiceStream>,
        open: usize,
        prompt_tokens: usize,
        completion_tokens: usize,
        done: bool,
    }
    // Streamed requests have `best_of == n`: the sequences are the choices, in order.
    let choices: Vec<ChoiceStream> = submitted
        .iter()
        .enumerate()
        .map(|(index, s)| ChoiceStream {
            index,
            first: true,
            offset: 0,
            echo: echoes[s.prompt].clone(),
            done: false,
            counts_prompt: index % n == 0,
        })
        .collect();
    // Each choice's events, tagged with its index; `None` once its channel closes.
    let events = stream::select_all(submitted.into_iter().enumerate().map(|(index, s)| {
        Box::pin(stream::unfold(
            Some(s.receiver),
            move |receiver| async move {
                let mut receiver = receiver?;
                match receiver.recv().await {
                    Some(event) => Some(((index, Some(event)), Some(receiver))),
                    None => Some(((index, None), None)),
                }
            },
        ))
    }));
    let state = S {
        meta,
        events,
        open: choices.len(),
        choices,
        prompt_tokens: 0,
        completion_tokens: 0,
        done: false,
    };
    let data = stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            if s.open == 0 {
                s.done = true;
                if !s.meta.include_usage {
                    return None;
                }
                let usage = s.meta.usage_chunk(s.prompt_tokens, s.completion_tokens);
                return Some((usage, s));
            }
            let dropped = || ApiError::internal("the scheduler dropped the request").body();
            let Some((index, event)) = s.events.next().await else {
                s.done = true;
                return Some((dropped(), s));
            };
            let choice = &mut s.choices[index];
            let Some(event) = event else {
                if choice.done {
                    continue;
                }
                s.done = true;
                return Some((dropped(), s));
            };
            match choice.on(&s.meta, event) {
                Sent::Nothing => continue,
                Sent::Chunk(chunk) => return Some((chunk, s)),
                Sent::Last {
                    chunk,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    if choice.counts_prompt {
                        s.prompt_tokens += prompt_tokens;
                    }
                    s.completion_tokens += completion_tokens;
                    s.open -= 1;
                    return Some((chunk, s));
                }
                Sent::Failed(body) => {
                    s.done = true;
                    return Some((body, s));
                }
            }
        }
    });
    data.map(|value| Ok(SseEvent::default().data(value.to_string())))
        .chain(stream::once(async {
            Ok(SseEvent::default().data("[DONE]"))
        }))
}

//! Chat templates: turning a conversation into the text a model was trained on.
//!
//! Hugging Face stores a Jinja template in tokenizer_config.json. Rather than embed a Jinja
//! engine, the engine recognises the template families LLaMA-style models use and renders them
//! by hand: ChatML (SmolLM2, Qwen, ...; including a default system prompt written into the
//! template), LLaMA-3, LLaMA-2 `[INST]`, and the Guanaco `### Human:` / `### Assistant:` format
//! (the fallback for a model without a template, as QLoRA's Guanaco was trained).
//!
//! Rendering returns segments, each marked trainable or not, so the trainer can put the loss on
//! the assistant's words alone.

use crate::error::{Error, Result};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message from its parts.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A piece of rendered text; `trainable` pieces are the assistant's words (and the marker that
/// ends them), the ones a chat fine-tune puts its loss on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The text.
    pub text: String,
    /// Whether the loss covers it.
    pub trainable: bool,
}

/// The chat formats the engine renders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<|im_start|>role\ncontent<|im_end|>\n`, with the system prompt the template adds when the
    /// conversation has none.
    ChatMl {
        /// System prompt inserted before a conversation that does not start with one.
        default_system: Option<String>,
    },
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` after `<|begin_of_text|>`.
    Llama3,
    /// `<s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] assistant </s>`.
    Llama2,
    /// `### Human: user### Assistant: assistant` (OpenAssistant-Guanaco).
    Guanaco,
}

impl ChatFormat {
    /// Recognises the family of a Jinja chat template; `None` (no template) means Guanaco.
    pub fn from_template(template: Option<&str>) -> Result<ChatFormat> {
        let Some(t) = template else {
            return Ok(ChatFormat::Guanaco);
        };
        if t.contains("<|im_start|>") {
            Ok(ChatFormat::ChatMl {
                default_system: chatml_default_system(t),
            })
        } else if t.contains("<|start_header_id|>") {
            Ok(ChatFormat::Llama3)
        } else if t.contains("[INST]") {
            Ok(ChatFormat::Llama2)
        } else if t.contains("### Human:") {
            Ok(ChatFormat::Guanaco)
        } else {
            Err(Error::unsupported(
                "the model's chat template is not ChatML, LLaMA-3, LLaMA-2 or Guanaco; pass --chat-format",
            ))
        }
    }

    /// Parses a `--chat-format` name: chatml, llama3, llama2, guanaco.
    pub fn from_name(name: &str) -> Result<ChatFormat> {
        match name {
            "chatml" => Ok(ChatFormat::ChatMl {
                default_system: None,
            }),
            "llama3" => Ok(ChatFormat::Llama3),
            "llama2" => Ok(ChatFormat::Llama2),
            "guanaco" => Ok(ChatFormat::Guanaco),
            other => Err(Error::invalid(format!(
                "--chat-format: {other:?} is not chatml, llama3, llama2 or guanaco"
            ))),
        }
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins. Roles other than system/user/assistant are an error.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<Segment>> {
        for m in messages {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(Error::invalid(format!(
                    "chat message role {:?} is not system, user or assistant",
                    m.role
                )));
            }
        }
        let mut out = Segments::default();
        match self {
            ChatFormat::ChatMl { default_system } => {
                if let Some(system) = default_system
                    .as_deref()
                    .filter(|_| messages.first().map(|m| m.role.as_str()) != Some("system"))
                {
                    out.fixed(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
                }
                for m in messages {
                    out.fixed(&format!("<|im_start|>{}\n", m.role));
                    if m.role == "assistant" {
                        out.train(&format!("{}<|im_end|>", m.content));
                        out.fixed("\n");
                    } else {
                        out.fixed(&format!("{}<|im_end|>\n", m.content));
                    }
                }
                if add_generation_prompt {
                    out.fixed("<|im_start|>assistant\n");
                }
            }
            ChatFormat::Llama3 => {
                out.fixed("<|begin_of_text|>");
                for m in messages {
                    out.fixed(&format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n",
                        m.role
                    ));
                    let body = format!("{}<|eot_id|>", m.content.trim());
                    if m.role == "assistant" {
                        out.train(&body);
                    } else {
                        out.fixed(&body);
                    }
                }
                if add_generation_prompt {
                    out.fixed("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
            ChatFormat::Llama2 => {
                let (system, rest) = match messages.first() {
                    Some(m) if m.role == "system" => (Some(m.content.as_str()), &messages[1..]),
                    _ => (None, messages),
                };
                for (i, m) in rest.iter().enumerate() {
                    match m.role.as_str() {
                        "user" => {
                            let content = match (i, system) {
                                (0, Some(s)) => {
                                    format!("<<SYS>>\n{s}\n<</SYS>>\n\n{}", m.content.trim())
                                }
                                _ => m.content.trim().to_string(),
                            };
                            out.fixed(&format!("<s>[INST] {content} [/INST]"));
                        }
                        _ => {
                            out.fixed(" ");
                            out.train(&format!("{} </s>", m.content.trim()));
                        }
                    }
                }
            }
            ChatFormat::Guanaco => {
                for m in messages {
                    match m.role.as_str() {
                        "assistant" => {
                            out.fixed("### Assistant: ");
                            out.train(&m.content);
                        }
                        _ => out.fixed(&format!("### Human: {}", m.content)),
                    }
                }
                if add_generation_prompt {
                    out.fixed("### Assistant:");
                }
            }
        }
        Ok(out.0)
    }

    /// Renders `messages` as one string (for generation).
    pub fn render_text(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        Ok(self
            .render(messages, add_generation_prompt)?
            .into_iter()
            .map(|s| s.text)
            .collect())
    }
}

/// Segments with neighbours of the same kind merged.
#[derive(Default)]
struct Segments(Vec<Segment>);

impl Segments {
    fn push(&mut self, text: &str, trainable: bool) {
        match self.0.last_mut() {
            Some(last) if last.trainable == trainable => last.text.push_str(text),
            _ => self.0.push(Segment {
                text: text.to_string(),
                trainable,
            }),
        }
    }
    fn fixed(&mut self, text: &str) {
        self.push(text, false);
    }
    fn train(&mut self, text: &str) {
        self.push(text, true);
    }
}

/// The system prompt a ChatML template writes when the conversation has none: the literal
/// `<|im_start|>system\n...<|im_end|>` inside a Jinja string, if there is one.
fn chatml_default_system(template: &str) -> Option<String> {
    const START: &str = "<|im_start|>system";
    let after = &template[template.find(START)? + START.len()..];
    // The newline is written as a Jinja escape (`\n`) or as a real newline.
    let body = after
        .strip_prefix("\\n")
        .or_else(|| after.strip_prefix('\n'))?;
    let literal = &body[..body.find("<|im_end|>")?];
    // A Jinja expression instead of literal text (e.g. `' + message['content'] + '`) is no default.
    if literal.contains('\'') || literal.contains('{') {
        return None;
    }
    Some(literal.replace("\\n", "\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn chatml_with_default_system_matches_the_jinja_output() {
        let f = ChatFormat::from_template(Some(SMOLLM2_TEMPLATE)).unwrap();
        let text = f.render_text(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_system = f
            .render_text(
                &[Message::new("system", "S"), Message::new("user", "Hi")],
                false,
            )
            .unwrap();
        assert_eq!(
            with_system,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn default_system_with_a_real_newline() {
        let template = SMOLLM2_TEMPLATE.replace("\\n", "\n");
        let f = ChatFormat::from_template(Some(&template)).unwrap();
        let want =
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face".to_string();
        assert_eq!(
            f,
            ChatFormat::ChatMl {
                default_system: Some(want)
            }
        );
    }

    #[test]
    fn only_assistant_words_are_trainable() {
        let f = ChatFormat::ChatMl {
            default_system: None,
        };
        let segs = f
            .render(
                &[Message::new("user", "Q"), Message::new("assistant", "A")],
                false,
            )
            .unwrap();
        let trainable: String = segs
            .iter()
            .filter(|s| s.trainable)
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(trainable, "A<|im_end|>");
        let g = ChatFormat::Guanaco
            .render_text(
                &[Message::new("user", "Q"), Message::new("assistant", "A")],
                false,
            )
            .unwrap();
        assert_eq!(g, "### Human: Q### Assistant: A");
    }

    #[test]
    fn llama_formats() {
        let msgs = [
            Message::new("system", "S"),
            Message::new("user", "Q"),
            Message::new("assistant", "A"),
        ];
        assert_eq!(
            ChatFormat::Llama2.render_text(&msgs, false).unwrap(),
            "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nQ [/INST] A </s>"
        );
        assert_eq!(
            ChatFormat::Llama3.render_text(&msgs[1..2], true).unwrap(),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert!(ChatFormat::Guanaco
            .render(&[Message::new("tool", "x")], false)
            .is_err());
    }
}

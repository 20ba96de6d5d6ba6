//! Post-processors: what `add_special_tokens` adds around an encoded sequence (LLaMA-2's BOS
//! through TemplateProcessing; ByteLevel's only touches offsets, so ids pass unchanged).

use super::json::{field, str_field, type_tag, At};
use crate::error::Result;
use serde_json::Value;

/// One item of a single-sequence template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TemplateItem {
    /// The ids of a special token (usually one).
    Special(Vec<u32>),
    /// The encoded text.
    Sequence,
}

/// The single-sequence template to apply, or nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PostProcessor {
    /// Empty means "leave the ids as they are".
    template: Vec<TemplateItem>,
}

impl PostProcessor {
    /// A template of `before` + sequence + `after`.
    pub(crate) fn wrap(before: Option<u32>, after: Option<u32>) -> Self {
        let mut template = Vec::new();
        template.extend(before.map(|id| TemplateItem::Special(vec![id])));
        template.push(TemplateItem::Sequence);
        template.extend(after.map(|id| TemplateItem::Special(vec![id])));
        PostProcessor { template }
    }

    /// Parses the `post_processor` object `value` found at `at`.
    pub(crate) fn from_json(value: &Value, at: &At) -> Result<Self> {
        let obj = at.object(value)?;
        match type_tag(obj, at)? {
            "ByteLevel" => Ok(PostProcessor::default()),
            "TemplateProcessing" => template_from_json(obj, at),
            "Sequence" => {
                let list_at = at.key("processors");
                let list = list_at.array(field(obj, "processors", at)?)?;
                let mut chosen = PostProcessor::default();
                for (i, v) in list.iter().enumerate() {
                    let p = PostProcessor::from_json(v, &list_at.index(i))?;
                    if !p.template.is_empty() {
                        if !chosen.template.is_empty() {
                            return Err(list_at.unsupported("more than one TemplateProcessing"));
                        }
                        chosen = p;
                    }
                }
                Ok(chosen)
            }
            other => Err(at.key("type").unsupported(format!(
                "post-processor {other:?} (supported: TemplateProcessing, ByteLevel, Sequence)"
            ))),
        }
    }

    /// The special token that the template puts first, if any (the BOS of LLaMA-2).
    pub(crate) fn leading_special(&self) -> Option<u32> {
        match self.template.first() {
            Some(TemplateItem::Special(ids)) if ids.len() == 1 => Some(ids[0]),
            _ => None,
        }
    }

    /// True if the template does nothing.
    pub(crate) fn is_identity(&self) -> bool {
        self.template.is_empty() || self.template == [TemplateItem::Sequence]
    }

    /// `ids` wrapped in the template.
    pub(crate) fn apply(&self, ids: Vec<u32>) -> Vec<u32> {
        if self.is_identity() {
            return ids;
        }
        let mut out = Vec::with_capacity(ids.len() + self.template.len());
        for item in &self.template {
            match item {
                TemplateItem::Special(special) => out.extend_from_slice(special),
                TemplateItem::Sequence => out.extend_from_slice(&ids),
            }
        }
        out
    }
}

fn template_from_json(obj: &serde_json::Map<String, Value>, at: &At) -> Result<PostProcessor> {
    let specials_at = at.key("special_tokens");
    let specials = specials_at.object(field(obj, "special_tokens", at)?)?;
    let single_at = at.key("single");
    let single = single_at.array(field(obj, "single", at)?)?;
    let mut template = Vec::with_capacity(single.len());
    for (i, item) in single.iter().enumerate() {
        let item_at = single_at.index(i);
        let item_obj = item_at.object(item)?;
        if let Some(special) = item_obj.get("SpecialToken") {
            let special_at = item_at.key("SpecialToken");
            let name = str_field(special_at.object(special)?, "id", &special_at)?;
            let entry_at = specials_at.key(name);
            let entry = entry_at.object(
                specials
                    .get(name)
                    .ok_or_else(|| entry_at.error("not defined in special_tokens"))?,
            )?;
            let ids_at = entry_at.key("ids");
            let ids = ids_at
                .array(field(entry, "ids", &entry_at)?)?
                .iter()
                .enumerate()
                .map(|(k, v)| ids_at.index(k).id(v))
                .collect::<Result<Vec<u32>>>()?;
            template.push(TemplateItem::Special(ids));
        } else if let Some(sequence) = item_obj.get("Sequence") {
            let sequence_at = item_at.key("Sequence");
            let id = str_field(sequence_at.object(sequence)?, "id", &sequence_at)?;
            if id != "A" {
                return Err(sequence_at.key("id").error(format!(
                    "a single-sequence template holds sequence A, not {id:?}"
                )));
            }
            template.push(TemplateItem::Sequence);
        } else {
            return Err(item_at.error("expected {\"SpecialToken\": ...} or {\"Sequence\": ...}"));
        }
    }
    Ok(PostProcessor { template })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama2_template_adds_bos() {
        let json: Value = serde_json::from_str(
            r#"{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},
               {"Sequence":{"id":"A","type_id":0}}],"pair":[],
               "special_tokens":{"<s>":{"id":"<s>","ids":[1],"tokens":["<s>"]}}}"#,
        )
        .unwrap();
        let p = PostProcessor::from_json(&json, &At::root("t")).unwrap();
        assert_eq!(p.apply(vec![5, 6]), [1, 5, 6]);
        assert_eq!(p.leading_special(), Some(1));
        assert_eq!(PostProcessor::wrap(None, Some(2)).apply(vec![5]), [5, 2]);
    }
}

//! What a shapes prompt asks for, read back from its words: the evaluator judges prompt
//! adherence against it. It reads the vocabulary of [`crate::data::toy`], in any of the
//! phrasings that module writes and in others.

use crate::data::toy::{COLORS, SHAPES, SIZES};

/// What a prompt asks for; `None` where it does not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptAttrs {
    pub shape: Option<String>,
    pub color: Option<String>,
    pub size: Option<String>,
    pub position: Option<String>,
    pub background: Option<String>,
}

/// Read the attributes a prompt names. The shape's colour is the colour word just before the
/// shape word; the background is the colour word before "background"/"backdrop" or after "on".
pub fn parse_prompt(prompt: &str) -> PromptAttrs {
    let lower = prompt.to_lowercase().replace(['-', ','], " ");
    let words: Vec<&str> = lower.split_whitespace().collect();
    let is_color = |w: &str| COLORS.iter().any(|c| c.0 == w);
    let mut out = PromptAttrs::default();
    for (i, w) in words.iter().enumerate() {
        if SHAPES.contains(w) && out.shape.is_none() {
            out.shape = Some(w.to_string());
            if i > 0 && is_color(words[i - 1]) {
                out.color = Some(words[i - 1].to_string());
            }
        }
        if SIZES.contains(w) {
            out.size = Some(w.to_string());
        }
        if (*w == "background" || *w == "backdrop") && i > 0 && is_color(words[i - 1]) {
            out.background = Some(words[i - 1].to_string());
        }
        if *w == "on" && i + 1 < words.len() && is_color(words[i + 1]) && out.shape.is_some() {
            out.background = Some(words[i + 1].to_string());
        }
    }
    let has = |w: &str| words.contains(&w);
    // The first of two opposite words the prompt has.
    let either = |a: &'static str, b: &'static str| [a, b].into_iter().find(|w| has(w));
    let (vert, horiz) = (either("top", "bottom"), either("left", "right"));
    out.position = match (vert, horiz) {
        (Some(v), Some(h)) => Some(format!("{v} {h}")),
        (Some(v), None) => Some(v.to_string()),
        (None, Some(h)) => Some(h.to_string()),
        (None, None) if has("center") || has("centre") || has("middle") => {
            Some("center".to_string())
        }
        _ => None,
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::toy::{caption, random_attrs};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn every_phrasing_parses_back_to_its_attributes() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..500 {
            let a = random_attrs(&mut rng);
            for p in 0..4 {
                let c = caption(&a, p);
                let got = parse_prompt(&c);
                assert_eq!(got.shape.as_deref(), Some(a.shape.as_str()), "{c}");
                assert_eq!(got.color.as_deref(), Some(a.color.as_str()), "{c}");
                assert_eq!(
                    got.background.as_deref(),
                    Some(a.background.as_str()),
                    "{c}"
                );
                if p != 2 {
                    assert_eq!(got.position.as_deref(), Some(a.position.as_str()), "{c}");
                    assert_eq!(got.size.as_deref(), Some(a.size.as_str()), "{c}");
                } else {
                    assert_eq!(got.position, None, "{c}");
                }
            }
        }
    }
}

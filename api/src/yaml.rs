//! YAML in and out: reading the hand-written files (the agent's routes file, the controller's
//! configuration) so that a bad value is reported with its key path, line and column, and
//! writing the generated CRDs.
//!
//! serde-saphyr locates every error (line and column of the offending node) but does not name
//! the key path; serde_path_to_error records the path while serde-saphyr deserializes.
use serde::{Deserialize, Deserializer, Serialize, de::DeserializeOwned};
use serde_path_to_error::Segment;

/// A YAML document that did not deserialize into the expected type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}{}", prefix(path), suffix(*line, *column))]
pub struct YamlError {
    /// The key path of the value at fault, as written in the file (`services[0].offloadPercent`);
    /// empty for the document itself or a syntax error before any key.
    pub path: String,
    /// 1-based line and column the parser points at, when it knows them.
    pub line: Option<u64>,
    pub column: Option<u64>,
    /// What is wrong, without the location.
    pub message: String,
}

fn prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

fn suffix(line: Option<u64>, column: Option<u64>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(" (line {line}, column {column})"),
        (Some(line), None) => format!(" (line {line})"),
        _ => String::new(),
    }
}

/// Deserializes one YAML document. `spanned` lists the keys whose values are
/// `serde_saphyr::Spanned<_>`: serde-saphyr hands such a value to serde as the `value` entry of a
/// mapping of its own, which would otherwise show up in the path (`address.value`).
pub fn from_str<T: DeserializeOwned>(text: &str, spanned: &[&str]) -> Result<T, YamlError> {
    let mut path = None;
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = Some(render_path(e.path(), spanned));
            e.into_inner()
        })
    })
    .map_err(|e| {
        // `Error::WithSnippet` wraps the error in a rendering of the source; the message and
        // location are the wrapped error's.
        let e = e.without_snippet();
        let location = e.location();
        YamlError {
            path: path.unwrap_or_default(),
            line: location.map(|l| l.line()).filter(|&l| l > 0),
            column: location.map(|l| l.column()).filter(|&c| c > 0),
            message: serde_saphyr::MessageFormatter::format_message(
                &serde_saphyr::DefaultMessageFormatter,
                e,
            )
            .into_owned(),
        }
    })
}

/// For `#[serde(default, deserialize_with = "beamlit_api::yaml::null_as_default")]` on a list,
/// map or section: a key with nothing after it (`services:` with every entry commented out)
/// reads as empty, as it did with serde_yaml; serde-saphyr refuses null for those types.
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// `services[0].remote.host`: keys joined by dots, indices in brackets; the synthetic `value`
/// step under a `spanned` key left out.
fn render_path(path: &serde_path_to_error::Path, spanned: &[&str]) -> String {
    let mut out = String::new();
    let mut previous: Option<&str> = None;
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
                previous = None;
            }
            Segment::Map { key } => {
                if key == "value" && previous.is_some_and(|p| spanned.contains(&p)) {
                    previous = None;
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
                previous = Some(key);
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
                previous = None;
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
                previous = None;
            }
        }
    }
    out
}

/// Serializes for a generated file. Long one-line strings (the CRDs' descriptions and CEL rules)
/// stay on one line instead of being folded (`>-`) at 80 columns, so that a changed
/// description shows in a diff as the one line it is.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string_with_options(
        value,
        serde_saphyr::ser_options! { folded_wrap_chars: usize::MAX },
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct File {
        #[serde(default, deserialize_with = "null_as_default")]
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Item {
        name: serde_saphyr::Spanned<String>,
        #[serde(default)]
        count: u8,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    }

    #[test]
    fn errors_carry_path_line_and_column() {
        let cases: &[(&str, &str, u64, u64, &str)] = &[
            (
                "items:\n  - name: a\n    cuont: 1\n",
                "items[0].cuont",
                3,
                5,
                "unknown field `cuont`",
            ),
            (
                "items:\n  - name: a\n  - name: b\n    count: 300\n",
                "items[1].count",
                4,
                12,
                "u8",
            ),
            (
                "items:\n  - count: 1\n",
                "items[0]",
                2,
                5,
                "missing field `name`",
            ),
            ("items:\n  - name: [x]\n", "items[0].name", 2, 11, ""),
            ("items: [\n", "items", 1, 8, "unclosed"),
        ];
        for (text, path, line, column, needle) in cases {
            let err = from_str::<File>(text, &["name"]).expect_err(text);
            assert_eq!(
                (err.path.as_str(), err.line, err.column),
                (*path, Some(*line), Some(*column)),
                "{text:?}: {err}"
            );
            assert!(err.message.contains(needle), "{text:?}: {err}");
            assert!(!err.message.contains("line"), "{text:?}: {err}");
            let shown = err.to_string();
            assert!(
                shown.starts_with(&format!("{path}: "))
                    && shown.ends_with(&format!("(line {line}, column {column})")),
                "{shown}"
            );
        }
    }

    #[test]
    fn spanned_values_keep_their_location() {
        let file: File = from_str(
            "items:\n  - name: a\n    count: 2\n    labels: {value: x}\n  - name: b\n",
            &["name"],
        )
        .expect("valid");
        let lines: Vec<u64> = file
            .items
            .iter()
            .map(|i| i.name.referenced.line())
            .collect();
        assert_eq!(lines, [2, 5]);
        assert_eq!(file.items[0].name.value, "a");
        assert_eq!(file.items[0].count, 2);
        assert_eq!(file.items[0].labels["value"], "x");
    }

    #[test]
    fn a_blank_list_is_empty() {
        for text in ["items:\n", "items:\n# - name: a\n", "items: []\n", ""] {
            let file: File = from_str(text, &[]).expect(text);
            assert!(file.items.is_empty(), "{text:?}");
        }
    }

    /// Only the synthetic step under a declared spanned key is left out of paths.
    #[test]
    fn a_key_named_value_elsewhere_stays_in_the_path() {
        let err = from_str::<File>("items:\n  - name: a\n    labels: {value: [1]}\n", &["name"])
            .expect_err("a list is not a label value");
        assert_eq!(err.path, "items[0].labels.value", "{err}");
    }
}

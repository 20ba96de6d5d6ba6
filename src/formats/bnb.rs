//! The Hugging Face bitsandbytes 4-bit layout, read and written.
//!
//! transformers saves each 4-bit weight `T` as a group of tensors:
//!
//! | key | dtype | shape |
//! | --- | --- | --- |
//! | `T` | U8 | `[(numel + 1) / 2, 1]`: two codes a byte, first element in the high nibble |
//! | `T.absmax` | F32, or U8 with double quantization | `[blocks]` |
//! | `T.quant_map` | F32 | `[16]`: the NF4 or FP4 code table |
//! | `T.nested_absmax` | F32 (double quantization only) | `[ceil(blocks / 256)]` |
//! | `T.nested_quant_map` | F32 (double quantization only) | `[256]`: the signed dynamic code |
//! | `T.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 | JSON bytes |
//!
//! The JSON holds `quant_type`, `blocksize`, `dtype` (the original torch dtype), `shape` and, with
//! double quantization, `nested_blocksize`, `nested_dtype` and `nested_offset`; it is written
//! exactly as bitsandbytes' `pack_dict_to_tensor` writes it (Python's `json.dumps`).

use crate::error::{Error, Result};
use crate::formats::safetensors::{ModelWeights, OwnedTensor};
use crate::quant::{
    code_table, dynamic_code_signed, Absmax, DoubleQuant, QuantState, QuantType, Quantized4,
};
use crate::tensor::{DType, TensorView};
use serde_json::{json, Value};

/// The key prefix of the JSON quant state, after the weight name.
const QUANT_STATE_KEY: &str = ".quant_state.bitsandbytes__";

/// Suffixes of the tensors that accompany a packed weight.
const COMPANIONS: [&str; 4] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
];

/// If `name` is the JSON quant state of a 4-bit weight, the weight's name.
pub fn weight_of_quant_state(name: &str) -> Option<&str> {
    let (weight, kind) = name.rsplit_once(QUANT_STATE_KEY)?;
    QuantType::from_name(kind).map(|_| weight)
}

/// True if `name` is one of the tensors that belong to a 4-bit weight other than the packed codes
/// themselves (absmax, maps, the JSON state), given the set of names present.
pub fn is_companion(name: &str, contains: impl Fn(&str) -> bool) -> bool {
    if weight_of_quant_state(name).is_some() {
        return true;
    }
    COMPANIONS.iter().any(|suffix| {
        name.strip_suffix(suffix).is_some_and(|weight| {
            ["nf4", "fp4"]
                .iter()
                .any(|q| contains(&format!("{weight}{QUANT_STATE_KEY}{q}")))
        })
    })
}

/// True if `name` is stored as a bitsandbytes 4-bit weight in `weights`.
pub fn weight_is_quantized(weights: &ModelWeights, name: &str) -> bool {
    ["nf4", "fp4"]
        .iter()
        .any(|q| weights.contains(&format!("{name}{QUANT_STATE_KEY}{q}")))
}

/// The names of every 4-bit weight in `weights`.
pub fn quantized_weights(weights: &ModelWeights) -> Vec<String> {
    weights
        .names()
        .filter_map(weight_of_quant_state)
        .map(str::to_owned)
        .collect()
}

/// Bytes stored for the 4-bit weight `name`: its packed codes and every companion tensor.
pub fn stored_bytes(weights: &ModelWeights, name: &str) -> u64 {
    let companions = COMPANIONS.iter().map(|suffix| format!("{name}{suffix}"));
    let states = ["nf4", "fp4"]
        .iter()
        .map(|q| format!("{name}{QUANT_STATE_KEY}{q}"));
    std::iter::once(name.to_string())
        .chain(companions)
        .chain(states)
        .filter_map(|n| weights.tensor(&n).ok().map(|t| t.bytes.len() as u64))
        .sum()
}

/// The tensors that store `q` under the weight name `name`, in the layout above.
pub fn to_tensors(name: &str, q: &Quantized4) -> Result<Vec<OwnedTensor>> {
    let s = &q.state;
    let mut out = vec![OwnedTensor::new(
        name,
        DType::U8,
        vec![q.packed.len(), 1],
        q.packed.clone(),
    )?];
    let mut meta = serde_json::Map::new();
    meta.insert("quant_type".into(), json!(s.quant_type.name()));
    meta.insert("blocksize".into(), json!(s.blocksize));
    let dtype = s
        .dtype
        .torch_name()
        .ok_or_else(|| Error::invalid(format!("{name}: dtype {} has no torch name", s.dtype)))?;
    meta.insert("dtype".into(), json!(dtype));
    meta.insert("shape".into(), json!(s.shape));
    match &s.absmax {
        Absmax::Plain(absmax) => {
            out.push(OwnedTensor::from_f32(
                format!("{name}.absmax"),
                vec![absmax.len()],
                absmax,
            )?);
            out.push(quant_map(name, s.quant_type)?);
        }
        Absmax::Double(dq) => {
            out.push(OwnedTensor::new(
                format!("{name}.absmax"),
                DType::U8,
                vec![dq.codes.len()],
                dq.codes.clone(),
            )?);
            out.push(quant_map(name, s.quant_type)?);
            out.push(OwnedTensor::from_f32(
                format!("{name}.nested_absmax"),
                vec![dq.nested_absmax.len()],
                &dq.nested_absmax,
            )?);
            out.push(OwnedTensor::from_f32(
                format!("{name}.nested_quant_map"),
                vec![256],
                dynamic_code_signed(),
            )?);
            meta.insert("nested_blocksize".into(), json!(dq.nested_blocksize));
            meta.insert("nested_dtype".into(), json!("float32"));
            meta.insert("nested_offset".into(), json!(dq.offset as f64));
        }
    }
    let bytes = python_json_dumps(&Value::Object(meta)).into_bytes();
    let key = format!("{name}{QUANT_STATE_KEY}{}", s.quant_type.name());
    out.push(OwnedTensor::new(key, DType::U8, vec![bytes.len()], bytes)?);
    Ok(out)
}

fn quant_map(name: &str, q: QuantType) -> Result<OwnedTensor> {
    OwnedTensor::from_f32(format!("{name}.quant_map"), vec![16], code_table(q))
}

/// JSON as Python's `json.dumps` writes it by default: `", "` and `": "` separators.
fn python_json_dumps(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), python_json_dumps(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(python_json_dumps)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// Reads the 4-bit weight `name` from `weights`: its packed codes and its quant state, checked
/// for consistency (sizes, code tables, dtypes).
pub fn read_quantized<'a>(weights: &'a ModelWeights, name: &str) -> Result<(&'a [u8], QuantState)> {
    let (key, quant_type) = ["nf4", "fp4"]
        .iter()
        .map(|q| format!("{name}{QUANT_STATE_KEY}{q}"))
        .zip([QuantType::Nf4, QuantType::Fp4])
        .find(|(key, _)| weights.contains(key))
        .ok_or_else(|| {
            Error::invalid(format!(
                "{name} is not a bitsandbytes 4-bit weight (no quant state)"
            ))
        })?;
    let bad = |problem: String| Error::format(format!("4-bit weight {name}"), problem);
    let state_json: Value = serde_json::from_slice(weights.tensor(&key)?.bytes)
        .map_err(|e| bad(format!("quant state is not valid JSON: {e}")))?;
    let field = |f: &str| {
        state_json
            .get(f)
            .ok_or_else(|| bad(format!("quant state lacks {f:?}")))
    };
    let as_usize = |v: &Value, f: &str| {
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| bad(format!("quant state field {f:?} is not a size")))
    };
    if field("quant_type")?.as_str() != Some(quant_type.name()) {
        return Err(bad(format!(
            "quant state says quant_type {}, key says {}",
            field("quant_type")?,
            quant_type.name()
        )));
    }
    let blocksize = as_usize(field("blocksize")?, "blocksize")?;
    let dtype_name = field("dtype")?.as_str().unwrap_or_default();
    let dtype = DType::from_torch_name(dtype_name)
        .filter(|d| d.is_float())
        .ok_or_else(|| {
            bad(format!(
                "quant state dtype {dtype_name:?} is not a float type"
            ))
        })?;
    let shape = field("shape")?
        .as_array()
        .ok_or_else(|| bad("quant state shape is not a list".into()))?
        .iter()
        .map(|d| as_usize(d, "shape"))
        .collect::<Result<Vec<_>>>()?;

    let f32_tensor = |suffix: &str| -> Result<Vec<f32>> {
        let t: TensorView = weights.tensor(&format!("{name}{suffix}"))?;
        if t.dtype != DType::F32 {
            return Err(bad(format!("{suffix} is {}, expected F32", t.dtype)));
        }
        Ok(t.to_f32(name)?.into_owned())
    };
    if f32_tensor(".quant_map")?
        .iter()
        .zip(code_table(quant_type))
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(bad(format!(
            "quant_map differs from the standard {} table (custom maps are unsupported)",
            quant_type.name()
        )));
    }
    let absmax_view = weights.tensor(&format!("{name}.absmax"))?;
    let absmax = match state_json.get("nested_offset") {
        None => {
            if absmax_view.dtype != DType::F32 {
                return Err(bad(format!(
                    "absmax is {} without double quantization, expected F32",
                    absmax_view.dtype
                )));
            }
            Absmax::Plain(absmax_view.to_f32(name)?.into_owned())
        }
        Some(offset) => {
            if absmax_view.dtype != DType::U8 {
                return Err(bad(format!(
                    "absmax is {} with double quantization, expected U8",
                    absmax_view.dtype
                )));
            }
            let offset = offset
                .as_f64()
                .ok_or_else(|| bad("nested_offset is not a number".into()))?
                as f32;
            let nested_blocksize = as_usize(field("nested_blocksize")?, "nested_blocksize")?;
            if f32_tensor(".nested_quant_map")?
                .iter()
                .zip(dynamic_code_signed())
                .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Err(bad(
                    "nested_quant_map differs from the signed dynamic code (unsupported)".into(),
                ));
            }
            Absmax::Double(DoubleQuant {
                codes: absmax_view.bytes.to_vec(),
                nested_absmax: f32_tensor(".nested_absmax")?,
                offset,
                nested_blocksize,
            })
        }
    };
    let state = QuantState {
        quant_type,
        blocksize,
        shape,
        dtype,
        absmax,
    };
    let packed = weights.tensor(name)?;
    if packed.dtype != DType::U8 {
        return Err(bad(format!(
            "packed weight is {}, expected U8",
            packed.dtype
        )));
    }
    state
        .validate(packed.bytes.len())
        .map_err(|e| bad(e.to_string()))?;
    Ok((packed.bytes, state))
}

/// The `quantization_config` that transformers writes into config.json for a 4-bit model.
pub fn quantization_config(
    quant_type: QuantType,
    double_quant: bool,
    compute_dtype: DType,
) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype.torch_name().unwrap_or("bfloat16"),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type.name(),
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_matches_json_dumps() {
        let v = json!({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 3], "nested_offset": 0.5});
        assert_eq!(
            python_json_dumps(&v),
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 3], "nested_offset": 0.5}"#
        );
    }

    #[test]
    fn recognises_quant_state_keys() {
        assert_eq!(
            weight_of_quant_state("a.weight.quant_state.bitsandbytes__nf4"),
            Some("a.weight")
        );
        assert_eq!(
            weight_of_quant_state("a.weight.quant_state.bitsandbytes__int8"),
            None
        );
        let present = |n: &str| n == "a.weight.quant_state.bitsandbytes__fp4";
        assert!(is_companion("a.weight.absmax", present));
        assert!(!is_companion("b.weight.absmax", present));
        assert!(!is_companion("a.weight", present));
    }
}

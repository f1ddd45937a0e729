// Field values: plain TypeScript values <-> the wire's `fieldsync.v1.Value` (SPEC §9).
//
//   null        no kind set (the field is cleared)
//   string      string_value (schema types string, text, enum)
//   bigint      int_value: int64, exact over the whole range (never a JS number)
//   number      an integer: int_value; otherwise double_value (schema type float;
//               the server coerces an int sent for a float field and says so in a warning)
//   boolean     bool_value
//   Date        timestamp_value (millisecond precision, as a Date has)
//   Json        json_value: a JSON document as text, kept as text so nothing is re-encoded
//   Uint8Array  bytes_value
import { create } from "@bufbuild/protobuf";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { type Value, ValueSchema } from "./gen/fieldsync/v1/common_pb.js";

/** A JSON document as text (schema type `json`). */
export class Json {
  constructor(readonly text: string) {}

  /** The document of a JavaScript value. */
  static of(value: unknown): Json {
    return new Json(JSON.stringify(value));
  }

  /** The parsed document. */
  parse(): unknown {
    return JSON.parse(this.text) as unknown;
  }
}

export type FieldValue = null | string | bigint | number | boolean | Date | Json | Uint8Array;
export type Fields = { [field: string]: FieldValue };

export function toValue(v: FieldValue): Value {
  if (v === null) return create(ValueSchema);
  switch (typeof v) {
    case "string":
      return create(ValueSchema, { kind: { case: "stringValue", value: v } });
    case "bigint":
      return create(ValueSchema, { kind: { case: "intValue", value: v } });
    case "number":
      if (Number.isSafeInteger(v)) {
        return create(ValueSchema, { kind: { case: "intValue", value: BigInt(v) } });
      }
      return create(ValueSchema, { kind: { case: "doubleValue", value: v } });
    case "boolean":
      return create(ValueSchema, { kind: { case: "boolValue", value: v } });
  }
  if (v instanceof Date) {
    return create(ValueSchema, { kind: { case: "timestampValue", value: timestampFromDate(v) } });
  }
  if (v instanceof Json) return create(ValueSchema, { kind: { case: "jsonValue", value: v.text } });
  return create(ValueSchema, { kind: { case: "bytesValue", value: v } });
}

export function fromValue(v: Value | undefined): FieldValue {
  if (v === undefined) return null;
  switch (v.kind.case) {
    case undefined:
      return null;
    case "stringValue":
      return v.kind.value;
    case "intValue":
      return v.kind.value;
    case "doubleValue":
      return v.kind.value;
    case "boolValue":
      return v.kind.value;
    case "timestampValue":
      return timestampDate(v.kind.value);
    case "jsonValue":
      return new Json(v.kind.value);
    case "bytesValue":
      return v.kind.value;
  }
}

export function toValues(fields: Fields | undefined): { [field: string]: Value } {
  const out: { [field: string]: Value } = {};
  for (const [name, value] of Object.entries(fields ?? {})) out[name] = toValue(value);
  return out;
}

export function fromValues(fields: { [field: string]: Value }): Fields {
  const out: Fields = {};
  for (const [name, value] of Object.entries(fields)) out[name] = fromValue(value);
  return out;
}

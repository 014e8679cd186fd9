"""JSON schemas and prompts the constrained-decoding tests share (test_structured.py, test_jump_forward.py)."""

# Strings are enums, patterns or bounded (maxLength) and arrays bounded, so that every answer has a short
# end: a random-weight model never closes a free string by chance (its closing quote is one token among
# thousands the grammar allows), and it could write a free number's decimals for as long as it is let.
SCHEMAS = {
    "invoice": {  # nested object, number with bounds, optional boolean
        "type": "object", "additionalProperties": False, "required": ["vendor", "total"],
        "properties": {
            "vendor": {"type": "object", "additionalProperties": False, "required": ["name", "country"],
                       "properties": {"name": {"type": "string", "maxLength": 8},
                                      "country": {"enum": ["DE", "FR", "US"]}}},
            "total": {"type": "number", "minimum": 0, "maximum": 1000},
            "paid": {"type": "boolean"}}},
    "meter": {  # integers with bounds, enum, optional field
        "type": "object", "additionalProperties": False, "required": ["reading", "unit"],
        "properties": {"reading": {"type": "integer", "minimum": 0, "maximum": 99999},
                       "unit": {"enum": ["kWh", "m3"]},
                       "digits": {"type": "integer", "minimum": 4, "maximum": 8}}},
    "labels": {  # array of enums with minItems / maxItems
        "type": "object", "additionalProperties": False, "required": ["labels"],
        "properties": {"labels": {"type": "array", "items": {"enum": ["cat", "dog", "cup", "car"]},
                                  "minItems": 1, "maxItems": 3},
                       "count": {"type": "integer", "minimum": 1, "maximum": 3}}},
    "detections": {  # array of nested objects
        "type": "object", "additionalProperties": False, "required": ["objects"],
        "properties": {"objects": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "additionalProperties": False, "required": ["label", "score"],
            "properties": {"label": {"type": "string", "maxLength": 6},
                           "score": {"type": "integer", "minimum": 0, "maximum": 100}}}}}},
    "form": {  # pattern, nullable optional string, boolean
        "type": "object", "additionalProperties": False, "required": ["signed", "date", "pages"],
        "properties": {"signed": {"type": "boolean"},
                       "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                       "pages": {"type": "integer", "minimum": 1, "maximum": 20},
                       "notes": {"type": ["string", "null"], "maxLength": 10}}},
}
PROMPTS = ["Read the invoice.", "Read the meter.", "What is in the photo?", "Fill in the form.", "Locate the objects."]

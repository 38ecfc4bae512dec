"""Text <-> token ids and chat templates for a model file, with the `tokenizers` library and no network.

From a GGUF: byte-level BPE (tokenizer.ggml.model 'gpt2') rebuilt from tokenizer.ggml.tokens / merges / token_type, with the
pre-tokenizer tokenizer.ggml.pre names; from a Hugging Face directory: tokenizer.json as is. BOS follows llama.cpp: prepended when
tokenizer.ggml.add_bos_token (or tokenizer_config.json's add_bos_token, or tokenizer.json's post-processor) says so, never twice, so
a chat template that already starts with bos_token does not get a second one. SmolLM2 adds none, as its Hugging Face tokenizer.
End of generation is the EOS id plus every special end-of-turn token in the vocabulary (<|im_end|>, <|eot_id|>, ...), as llama.cpp.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from exo.base.errors import BadInput
from exo.base.files import read_bytes
from exo.inference.gguf_header import read_header
from exo.inference.gguf_model import gguf_field
from exo.inference.model_file_checks import MAX_JSON_BYTES, read_json

MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.json: the largest vocabularies' (256k tokens) are about 35 MB
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")  # llama.cpp's EOG texts
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")  # llama.cpp splits each digit, then applies GPT-2's regex
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3")
_GPT2 = ("gpt-2", "phi-2")
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


def _pre_tokenizer(pre: str):
  if pre in _DIGITS_THEN_GPT2:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
  if pre in _LLAMA3:
    split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  if pre in _GPT2:
    return pre_tokenizers.ByteLevel(add_prefix_space=False)
  raise BadInput(f"GGUF pre-tokenizer {pre!r} is not supported; expected one of {', '.join(_DIGITS_THEN_GPT2 + _LLAMA3 + _GPT2)}")


class Tokenizer:
  def __init__(
    self,
    tokenizer: _HFTokenizer,
    bos_token_id: int | None,
    eos_token_id: int | None,
    eos_token_ids: set[int],
    add_bos: bool,
    chat_template: str | None,
  ):
    """eos_token_id: the model's EOS (the template's eos_token); eos_token_ids: every id that ends generation."""
    self.tokenizer, self.bos_token_id, self.eos_token_id = tokenizer, bos_token_id, eos_token_id
    self.add_bos, self.chat_template = add_bos, chat_template
    self.eos_token_ids = eos_token_ids | ({eos_token_id} if eos_token_id is not None else set())
    self._template = None

  def encode(self, text: str) -> list[int]:
    """Special tokens written in the text (<|im_start|>, ...) become their ids; BOS is prepended only if the model wants it."""
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    if self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
      ids = [self.bos_token_id, *ids]
    return ids

  def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    """The prompt text for `messages`, rendered as Hugging Face's apply_chat_template(tokenize=False) renders it."""
    if self.chat_template is None:
      raise BadInput("the model file has no chat template; expected tokenizer.chat_template in the GGUF or chat_template in tokenizer_config.json")
    if self._template is None:
      self._template = _compile(self.chat_template)
    tokens = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id}
    tokens = {name: "" if i is None else self.tokenizer.id_to_token(i) for name, i in tokens.items()}
    return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens, **kwargs)

  @classmethod
  def from_gguf(cls, path: Path | str) -> "Tokenizer":
    metadata = read_header(str(path))

    def field(key: str, default=None):
      return gguf_field(metadata, f"tokenizer.ggml.{key}", default)

    if field("model") != "gpt2":
      raise BadInput(f"GGUF tokenizer model {field('model')!r} in {path} is not supported; expected 'gpt2' (byte-level BPE)")
    pre, tokens, types = field("pre", "gpt-2"), field("tokens"), field("token_type", [])
    merges = [tuple(m.split(" ", 1)) for m in field("merges")]
    tokenizer = _HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=pre in _LLAMA3))
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED])
    eos = {int(field(key)) for key in ("eot_token_id", "eom_token_id") if field(key) is not None}
    eos |= {i for i, t in enumerate(types) if t == _CONTROL and tokens[i] in _END_OF_TURN}
    bos, eos_id = field("bos_token_id"), field("eos_token_id")
    add_bos = bool(field("add_bos_token", pre in _LLAMA3))  # llama.cpp's default: only Llama 3's BPE adds BOS unless told
    bos, eos_id = None if bos is None else int(bos), None if eos_id is None else int(eos_id)
    return cls(tokenizer, bos, eos_id, eos, add_bos, gguf_field(metadata, "tokenizer.chat_template"))

  @classmethod
  def from_hf_dir(cls, directory: Path | str) -> "Tokenizer":
    directory = Path(directory)
    text = read_bytes(directory / "tokenizer.json", "tokenizer file", MAX_TOKENIZER_BYTES).decode("utf-8", errors="replace")
    try:
      tokenizer = _HFTokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot read
      raise BadInput(f"{directory / 'tokenizer.json'} is not a tokenizer the tokenizers library reads: {str(e)[:200]}") from None

    def read(name: str) -> dict:
      return read_json(directory / name, name) if (directory / name).is_file() else {}

    def token_id(token: str | dict | None) -> int | None:
      return tokenizer.token_to_id(token["content"] if isinstance(token, dict) else token) if token else None

    def ids(value: int | list[int] | None) -> list[int]:
      return value if isinstance(value, list) else [] if value is None else [value]

    tok_config, config, gen_config = read("tokenizer_config.json"), read("config.json"), read("generation_config.json")
    bos = token_id(tok_config.get("bos_token"))
    bos = config.get("bos_token_id") if bos is None else bos
    eos_id = token_id(tok_config.get("eos_token"))
    eos_id = next(iter(ids(config.get("eos_token_id"))), None) if eos_id is None else eos_id
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    eos = set(ids(config.get("eos_token_id")) + ids(gen_config.get("eos_token_id")))
    eos |= {tokenizer.token_to_id(t) for t in _END_OF_TURN if t in specials}
    if "add_bos_token" in tok_config:
      add_bos = bool(tok_config["add_bos_token"])
    else:  # tokenizer.json's post-processor decides, as in transformers
      with_specials, without = tokenizer.encode("a").ids, tokenizer.encode("a", add_special_tokens=False).ids
      add_bos = bos is not None and with_specials[:1] == [bos] and without[:1] != [bos]
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
      template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (directory / "chat_template.jinja").is_file():  # newer exports keep the template in its own file
      template = read_bytes(directory / "chat_template.jinja", "chat template", MAX_JSON_BYTES).decode("utf-8", errors="replace")
    return cls(tokenizer, bos, eos_id, eos, add_bos, template)


def load_tokenizer(path: Path | str) -> Tokenizer:
  """The tokenizer of a model located by exo.inference.model_files.locate_model: a .gguf file or a Hugging Face directory."""
  return Tokenizer.from_gguf(path) if Path(path).suffix == ".gguf" else Tokenizer.from_hf_dir(path)


def _compile(source: str):
  """The template in a sandbox configured as transformers configures it (trim_blocks, lstrip_blocks, loopcontrols, tojson)."""
  from datetime import datetime

  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
  return env.from_string(source)

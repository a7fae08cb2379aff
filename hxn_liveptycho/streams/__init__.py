"""Wire formats in and out: Eiger SIMPLON stream, PandA position stream, and frame codecs."""

from hxn_liveptycho.streams.codecs import ENCODINGS, decode, encode
from hxn_liveptycho.streams.curve import CurveKeys
from hxn_liveptycho.streams.eiger import EigerFrame, EigerPublisher, EigerReceiver
from hxn_liveptycho.streams.panda import PandaPublisher, PandaReceiver

__all__ = [
    "ENCODINGS",
    "CurveKeys",
    "EigerFrame",
    "EigerPublisher",
    "EigerReceiver",
    "PandaPublisher",
    "PandaReceiver",
    "decode",
    "encode",
]

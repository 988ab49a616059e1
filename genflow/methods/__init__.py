"""Generative methods, one file per paper. See ``base.Method`` for the protocol."""
from genflow.methods.base import Autoguided, Method, autoguided, guided, null_cond, randn
from genflow.methods.edm import EDM
from genflow.methods.pfgmpp import PFGMPP
from genflow.methods.ddpm import DDPM
from genflow.methods.spd import SPD
from genflow.methods.paths import CondOT, Cosine, KineticOptimal, Scheduler, SchedulerOutput, VP
from genflow.methods.kinetic import kinetic_energy
from genflow.methods.flow import FlowMatching
from genflow.methods.lfm import LatentFactorModel

__all__ = ["Method", "guided", "Autoguided", "autoguided", "null_cond", "randn", "EDM", "PFGMPP", "DDPM", "SPD", "FlowMatching", "CondOT", "Cosine", "VP",
           "KineticOptimal", "Scheduler", "SchedulerOutput", "kinetic_energy",
           "LatentFactorModel"]

'use strict';
// Never loaded by Node: require('https') resolves to the core module first.
module.exports = require('node:https');
